"""Temperature sampling of many rows in one GPU kernel (Triton), reading each row's logits about once.

The same draw as the sampler's torch path: softmax(logits / T), then the first token whose cumulative
probability passes u * total, with u the row's uniform (a hash of its seed and position). Done in torch
that is six passes over a [rows, vocab] float32 tensor (divide, softmax, cumsum, search, argmax,
select) plus the float32 copy of the logits; here each program takes one row in blocks: the max and the
sum of each block in one pass, then only the block holding the sampled token again. Rows with T = 0
take the argmax. Sums run in another order than torch's cumsum, so a draw that lands within rounding
of a boundary may pick the neighbouring token: the distribution is the same.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from scheduler_proc.counter_rng import GOLDEN, MASK53, MIX1, MIX2

_BLOCK = 4096

_HASH_CONSTANTS = (MIX1, MIX2, GOLDEN, MASK53)  # counter_rng.row_uniform's


@triton.jit
def _counter_uniform(seed, position, mix1, mix2, golden, mask53):
    """counter_rng.row_uniform, bit for bit: int64 arithmetic wraps, and its shifts are arithmetic as torch's."""
    z = seed.to(tl.int64) * mix1 + position.to(tl.int64) * golden
    z = (z ^ (z >> 30)) * mix1
    z = (z ^ (z >> 27)) * mix2
    z = z ^ (z >> 31)
    return ((z & mask53).to(tl.float64) * (1.0 / 9007199254740992.0)).to(tl.float32)


@triton.jit
def _grammar_allows(x, idx, bits_row, bits_vocab, on):
    """x where the row's grammar bitmask (xgrammar's: bit t%32 of int32 word t//32 set = allowed) allows the
    token, else -inf; a token past the bitmask's vocabulary (a model's padding id) is forbidden too. A row
    without a grammar (on == 0) keeps every token."""
    word = tl.load(bits_row + idx // 32, mask=idx < bits_vocab, other=0)
    allowed = ((word >> (idx % 32)) & 1) != 0
    return tl.where(allowed | (on == 0), x, -float("inf"))


@triton.jit
def _draw_in_block(
    base, vocab, chosen, scale, best_value, target, bits_row, bits_vocab, on, BLOCK: tl.constexpr, MASKED: tl.constexpr
):
    """Pass 2, one block: its first token whose cumulative mass passes what is left of the target."""
    offsets = tl.arange(0, BLOCK)
    idx = chosen * BLOCK + offsets
    x = tl.load(base + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32) * scale
    if MASKED:
        x = _grammar_allows(x, idx, bits_row, bits_vocab, on)
    within = tl.cumsum(tl.exp(x - best_value), 0)
    last = tl.minimum(vocab - chosen * BLOCK, BLOCK) - 1
    pick = tl.minimum(tl.sum((within <= target).to(tl.int32), 0), last)
    return (chosen * BLOCK + pick).to(tl.int64)


@triton.jit
def _row_uniform(row, uniform, seeds, positions, mix1, mix2, golden, mask53, HASH: tl.constexpr):
    """The row's uniform: given, or hashed from its seed and position (counter_rng.row_uniform)."""
    # Both branches under one constexpr if: a statement after it would be compiled for HASH too.
    if HASH:
        u = _counter_uniform(tl.load(seeds + row), tl.load(positions + row), mix1, mix2, golden, mask53)
    else:
        u = tl.load(uniform + row)
    return u


@triton.jit
def _pick_block(block_max, block_sum, num_blocks, best_value, u, NUM_BLOCKS: tl.constexpr):
    """Which block holds the token, the first whose cumulative (rescaled) mass passes u * total, and what is
    left of that target inside it."""
    blocks = tl.arange(0, NUM_BLOCKS)
    bm = tl.load(block_max + blocks, mask=blocks < num_blocks, other=-float("inf"))
    bs = tl.load(block_sum + blocks, mask=blocks < num_blocks, other=0.0)
    mass = bs * tl.exp(bm - best_value)
    target = u * tl.sum(mass, 0)
    before = tl.cumsum(mass, 0)
    chosen = tl.minimum(tl.sum((before <= target).to(tl.int32), 0), num_blocks - 1)
    return chosen, target - tl.sum(tl.where(blocks < chosen, mass, 0.0), 0)


# Pass 1 over a row: per block, the largest scaled logit (and where it is) and the sum of exp(x - block max);
# greedy rows end there, the others draw in the one block that holds their token (pass 2).
@triton.jit
def _sample_rows(
    logits,
    row_index,
    row_stride,
    vocab,
    temperature,
    uniform,
    seeds,
    positions,
    mix1,
    mix2,
    golden,
    mask53,
    block_max,
    block_sum,
    out,
    bits,
    bits_stride,
    bits_vocab,
    constrained,
    BLOCK: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    HASH: tl.constexpr,
    MASKED: tl.constexpr,
    EVERY_ROW: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits + tl.load(row_index + row) * row_stride
    bits_row = bits + row.to(tl.int64) * bits_stride  # the mask's rows are the sampled rows, in order
    on = 1
    if MASKED and not EVERY_ROW:
        on = tl.load(constrained + row).to(tl.int32)
    t = tl.load(temperature + row)
    greedy = t == 0.0
    scale = 1.0 / tl.where(greedy, 1.0, t)
    offsets = tl.arange(0, BLOCK)
    best_value = -float("inf")
    best_index = 0
    for b in range(0, tl.cdiv(vocab, BLOCK)):
        idx = b * BLOCK + offsets
        x = tl.load(base + idx, mask=idx < vocab, other=-float("inf")).to(tl.float32) * scale
        if MASKED:
            x = _grammar_allows(x, idx, bits_row, bits_vocab, on)
        m = tl.max(x, 0)
        tl.store(block_max + row * NUM_BLOCKS + b, m)
        # A block the grammar masked whole holds no mass (exp(-inf - -inf) would be NaN).
        tl.store(block_sum + row * NUM_BLOCKS + b, tl.where(m == -float("inf"), 0.0, tl.sum(tl.exp(x - m), 0)))
        arg = tl.argmax(x, 0)
        better = m > best_value  # strict: the first maximum wins, as torch.argmax
        best_index = tl.where(better, b * BLOCK + arg, best_index)
        best_value = tl.where(better, m, best_value)
    if greedy:
        tl.store(out + row, best_index.to(tl.int64))
    else:
        u = _row_uniform(row, uniform, seeds, positions, mix1, mix2, golden, mask53, HASH)
        at = row * NUM_BLOCKS
        chosen, target = _pick_block(block_max + at, block_sum + at, tl.cdiv(vocab, BLOCK), best_value, u, NUM_BLOCKS)
        drawn = _draw_in_block(base, vocab, chosen, scale, best_value, target, bits_row, bits_vocab, on, BLOCK, MASKED)
        tl.store(out + row, drawn)


def fused_sample(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    uniform: Optional[torch.Tensor] = None,
    seeds: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    bits: Optional[torch.Tensor] = None,
    bits_vocab: int = 0,
    constrained: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token per entry of `rows` (int64 [S]: rows of logits [R, V], any float dtype, unit stride along V),
    with temperature [S] (0: greedy) and either uniform [S] in [0, 1) or the sampler's counter, seeds [S]
    int64 and positions [S], hashed in the kernel as counter_rng.row_uniform does (a dozen small
    kernels fewer each step) -> token ids [S] int64.

    With a grammar mask, bits [S, ceil(bits_vocab / 32)] int32 (grammar_mask.py's) applies to the rows that
    constrained [S] bool marks (None: every row), read in place of a masked float32 copy of the logits."""
    vocab = logits.shape[1]
    assert logits.stride(1) == 1 and (bits is None or bits.stride(1) == 1)
    assert (uniform is None) != (seeds is None or positions is None), "give uniform, or seeds and positions"
    count = rows.shape[0]
    num_blocks = triton.next_power_of_2(triton.cdiv(vocab, _BLOCK))
    scratch = torch.empty((2, count, num_blocks), dtype=torch.float32, device=logits.device)
    out = torch.empty(count, dtype=torch.int64, device=logits.device)
    hashed = uniform is None
    if count:
        _sample_rows[(count,)](
            logits,
            rows.contiguous(),
            logits.stride(0),
            vocab,
            temperature.float().contiguous(),
            out if hashed else uniform.float().contiguous(),  # not read when hashed
            seeds.contiguous() if hashed else out,
            positions.contiguous() if hashed else out,
            *_HASH_CONSTANTS,
            scratch[0],
            scratch[1],
            out,
            out if bits is None else bits,  # not read without a mask
            0 if bits is None else bits.stride(0),
            bits_vocab,
            out if constrained is None else constrained,
            BLOCK=_BLOCK,
            NUM_BLOCKS=num_blocks,
            HASH=hashed,
            MASKED=bits is not None,
            EVERY_ROW=constrained is None,
        )
    return out
