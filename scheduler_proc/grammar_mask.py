"""The vocabulary mask of a step's constrained rows: filled on the host from the requests' matchers
(xgrammar), copied to the device, and applied there: read by the fused sampling kernel beside the logits
(fused_sample.py), or, for the torch sampler and masked logprobs, by apply_token_mask (xgrammar's kernel:
-inf wherever the grammar forbids the token). The matchers advance past each step's tokens here too.

Each is one xgrammar call: on the device's host (32 cores), 256 matchers took 0.8 ms to fill and 1.0 ms to
advance that way, and 1.3 and 4.3 ms split over 8 threads (the per-call hand-off and the Python around each
shard cost more than the rows save; scripts/bench_grammar_host.py).

A step with a constrained row samples only once each of its requests has its previous token in its
matcher; scheduler.py decides when that is (with overlap, after the step before is read). With overlap
the mask is filled ahead (fill_ahead) on one worker thread as soon as the matchers are current, while the
scheduler's thread sends outputs and schedules the next step: xgrammar's fill releases the GIL, and that
host work was on the path between two device steps.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from scheduler_proc.forward_batch import to_device
from scheduler_proc.request import Request


@dataclass
class StepMask:
    """A step's mask: bits [S, ceil(vocab / 32)] int32 over the tokenizer's ids (0: forbidden), and the rows
    that have a grammar, whose logits past `vocab` (a model's padding, no token at all) are forbidden too."""

    bits: torch.Tensor
    vocab: int
    constrained: Optional[torch.Tensor]  # [S] bool on the bits' device: rows with a grammar; None: every row


class TokenMasks:
    """One [rows, ceil(vocab / 32)] int32 bitmask, reused every step, allocated on first use; vocab: the
    tokenizer's ids (the grammars' vocabulary: filling also over a model's padding ids cost xgrammar 20x)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device, logits_width: int = 0) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.logits_width = logits_width or vocab_size  # the model's logits: its vocabulary, padding included
        self._host: Optional[torch.Tensor] = None  # pinned on CUDA, so the copy to the device is asynchronous
        self._on_device: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None  # the host buffer may be written again after this
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher
        self._worker: Optional[ThreadPoolExecutor] = None  # fills ahead (fill_ahead), started on first use
        self._ahead: Optional[tuple[list[Request], Future]] = None

    def accept(self, pairs: list[tuple[Request, int]]) -> None:
        """Advance each constrained request's matcher past its new token. A token the grammar refuses
        cannot come from a masked step; should one come anyway, that request gets an error (and ends),
        not the engine."""
        from xgrammar.base import _core

        # xgrammar's own batch_accept_token turns the C++ result into a list one element at a time (0.5 ms at
        # 256 rows on the device's host, half of the call); a refused token is rare, and the array's `in` is
        # one C++ call. (_core: pinned with xgrammar's minor version in pyproject.toml.)
        handles = [req.grammar._handle for req, _ in pairs]
        accepted = _core.BatchGrammarMatcher.batch_accept_token(handles, [t for _, t in pairs], False)
        if 0 not in accepted:  # its elements are ints: `False in` never matches
            return
        for (req, token), ok in zip(pairs, list(accepted)):
            if not ok and req.error is None:
                kind = req.sampling.constraint[0]
                req.error = f"token {token} does not continue the output allowed by sampling_params.{kind}"

    def fill_ahead(self, reqs: list[Request]) -> None:
        """Start filling the host rows of the step that samples next (reqs in sampling-row order) on the worker
        thread; fill() with the same list takes them. Call it once every matcher of reqs is current: nothing
        may advance those matchers until fill() returns."""
        self._take_ahead()
        host, _ = self._buffers()
        self._host_free()
        live = _live(reqs)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-masks")
        started = threading.Event()
        self._ahead = (reqs, self._worker.submit(self._fill_rows, reqs, live, host, started))
        # Hand the GIL over until the worker is inside xgrammar (which releases it): a thread woken while
        # this one runs Python gets the GIL only when this one blocks or after the 5 ms switch interval,
        # so the fill started at the join instead of beside the scheduling.
        started.wait()

    def fill(self, reqs: list[Request]) -> StepMask:
        """The mask of a step's sampled rows (reqs in sampling-row order), on the device: row s allows what
        reqs[s]'s grammar allows next, or every token for a free request, or for one that has ended (its
        token is dropped). A matcher that fails sets that request's error and leaves its row open."""
        host, on_device = self._buffers()
        if self._take_ahead() is not reqs:
            self._host_free()
            self._fill_rows(reqs, _live(reqs), host)
        rows = host[: len(reqs)]
        with_grammar = [req.grammar is not None for req in reqs]
        every_row = all(with_grammar)  # then nothing to copy, and a plain fill of the padding
        constrained = None if every_row else to_device(with_grammar, torch.bool, self.device)
        if on_device is host:
            return StepMask(rows, self.vocab_size, constrained)
        on_device = on_device[: len(reqs)]
        on_device.copy_(rows, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return StepMask(on_device, self.vocab_size, constrained)

    def _take_ahead(self) -> Optional[list[Request]]:
        """Wait for the fill started ahead, if any; returns the requests it filled for."""
        if self._ahead is None:
            return None
        reqs, future = self._ahead
        self._ahead = None
        future.result()
        return reqs

    def _host_free(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the buffer (long since, in practice)

    def _fill_rows(
        self, reqs: list[Request], live: list[int], host: torch.Tensor, started: Optional[threading.Event] = None
    ) -> None:
        try:
            rows = host[: len(reqs)]
            matchers = [reqs[s].grammar for s in live]
        finally:
            if started is not None:
                started.set()
        if len(live) < len(reqs):  # xgrammar writes a live row whole; the others allow every token (all bits set)
            rows.numpy()[sorted(set(range(len(reqs))).difference(live))] = -1
        try:
            if live:
                self._batch.batch_fill_next_token_bitmask(matchers, host, live)
        except Exception:  # find the matcher that failed: it alone ends
            for s in live:
                try:
                    reqs[s].grammar.fill_next_token_bitmask(host, s)
                except Exception as exc:
                    reqs[s].error = f"filling the token mask failed: {type(exc).__name__}: {exc}"
                    rows[s].numpy().fill(-1)

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host is None:
            import xgrammar

            width = xgrammar.get_bitmask_shape(self.max_rows, self.vocab_size)[1]
            cuda = self.device.type == "cuda"
            self._host = torch.empty((self.max_rows, width), dtype=torch.int32, pin_memory=cuda)
            self._on_device = torch.empty_like(self._host, device=self.device) if cuda else self._host
            self._batch = xgrammar.BatchGrammarMatcher(max_threads=1)
            if cuda:
                self._compile_mask_kernel()
        assert self._on_device is not None
        return self._host, self._on_device

    def _compile_mask_kernel(self) -> None:
        """Compile xgrammar's Triton kernel for every class of row count now, at the first constrained step:
        Triton compiles an integer argument apart when it is 1, a multiple of 16, or neither, and a step
        that first met a class (a request alone in its step) stalled every request while it compiled."""
        assert self._on_device is not None
        for rows in (1, 16, 17):
            if rows <= self.max_rows:
                logits = torch.zeros(rows, self.logits_width, device=self.device)
                mask = StepMask(self._on_device[:rows].fill_(-1), self.vocab_size, None)
                apply_token_mask(logits, mask)


def _live(reqs: list[Request]) -> list[int]:
    """The rows whose grammar decides their next token (a request that ended keeps its row open)."""
    return [s for s, req in enumerate(reqs) if req.grammar is not None and req.finish is None and req.error is None]


def apply_token_mask(logits: torch.Tensor, mask: StepMask) -> None:
    """Set logits [S, V] to -inf where the mask forbids the token (in place)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, mask.bits, vocab_size=min(mask.vocab, logits.shape[1]))
    if logits.shape[1] <= mask.vocab:
        return
    if mask.constrained is None:
        logits[:, mask.vocab :] = float("-inf")
    else:
        logits[:, mask.vocab :].masked_fill_(mask.constrained[:, None], float("-inf"))
