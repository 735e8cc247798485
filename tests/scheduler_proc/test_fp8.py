"""Issue 21, FP8 on CPU without an engine: dequantization (block-wise with ragged edges, per row, per tensor)
equals references written here; an FP8 folder in HF's layout loads into FP8 layers whose weights are the
checkpoint's, whole and as each tensor-parallel rank's shard with its scales; a trainer's bf16 weights
are re-quantized as they are written; an FP8 KV pool stores keys / scale in e4m3."""

from __future__ import annotations

import math

import pytest
import torch
from fp8_folders import FP8, block_dequantize, block_quantize, write_fp8_folders
from reference import tiny_model_dir

from engine.shared.args import read_model_config
from engine.shared.quant_config import fp8_scheme
from scheduler_proc.kv_pool import KVPool
from scheduler_proc.layers.fp8 import (
    dequantize,
    quantize_blockwise,
    quantize_per_channel,
    quantize_per_token,
    quantize_per_token_group,
)
from scheduler_proc.loader import build_model
from scheduler_proc.tp.group import TPGroup
from scheduler_proc.weight_read import read_weight
from scheduler_proc.weight_update import UpdateRefused, update_from_tensors

CPU = torch.device("cpu")
BLOCK = (16, 32)  # small blocks, so a 64-wide model has several, and tp=2 splits at block edges
LAYER_MODULES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj"}


def _e4m3_error(x: torch.Tensor, scale) -> torch.Tensor:
    """The most rounding to e4m3 may change x stored as x / scale: half a step of 3 mantissa bits (1/16 of
    the value), or half the subnormal step 2**-9 (times the scale) near zero."""
    return x.abs() / 16 + scale * 2**-10 + 1e-7


def _random_fp8(rows: int, cols: int) -> torch.Tensor:
    return (torch.randn(rows, cols) * 100).clamp(-448, 448).to(FP8)


def test_blockwise_dequantize_with_ragged_edges_equals_reference():
    torch.manual_seed(0)
    q = _random_fp8(300, 200)  # 128x128 blocks: 3 x 2, the last row and column of blocks ragged
    scale = torch.rand(3, 2) + 0.1
    expected = torch.empty(300, 200)
    for i in range(300):
        for j in range(200):
            expected[i, j] = float(q[i, j].float()) * float(scale[i // 128, j // 128])
    assert torch.equal(dequantize(q, scale, torch.float32, (128, 128)), expected)


def test_per_channel_and_per_tensor_dequantize_equal_reference():
    torch.manual_seed(1)
    q = _random_fp8(5, 7)
    rows = torch.rand(5) + 0.1
    expected = torch.tensor([[float(q[i, j].float()) * float(rows[i]) for j in range(7)] for i in range(5)])
    assert torch.equal(dequantize(q, rows, torch.float32), expected)
    assert torch.equal(dequantize(q, rows[:, None], torch.float32), expected)  # [N, 1], as checkpoints store it
    assert torch.equal(dequantize(q, torch.tensor(0.5), torch.float32), q.float() * 0.5)


def test_quantizers_round_trip_within_e4m3_precision():
    torch.manual_seed(2)
    weight = torch.randn(300, 200)
    q, scale = quantize_blockwise(weight, (128, 128))
    assert scale.shape == (3, 2) and q.dtype == FP8
    ref_q, ref_scale = block_quantize(weight, (128, 128))  # the test's own block loop
    assert torch.allclose(scale, ref_scale) and torch.equal(q.float(), ref_q.float())
    assert torch.equal(dequantize(q, scale, torch.float32, (128, 128)), block_dequantize(q, scale, (128, 128)))
    q, scale = quantize_per_channel(weight)
    error = (dequantize(q, scale, torch.float32) - weight).abs()
    assert (error <= _e4m3_error(weight, scale[:, None])).all()
    assert torch.allclose(q.float().abs().amax(dim=1), torch.full((300,), 448.0))  # each row's amax maps to 448
    x = torch.randn(4, 200)
    x_q, x_scale = quantize_per_token(x)
    assert x_scale.shape == (4, 1) and ((x_q.float() * x_scale - x).abs() <= _e4m3_error(x, x_scale)).all()
    g_q, g_scale = quantize_per_token_group(x, 128)
    assert g_scale.shape == (4, 2)
    assert torch.allclose(g_scale[:, 1], x[:, 128:].abs().amax(dim=1) / 448)
    full_scale = g_scale.repeat_interleave(128, 1)[:, :200]
    assert ((g_q.float() * full_scale - x).abs() <= _e4m3_error(x, full_scale)).all()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_model_path) -> dict[str, tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("fp8")
    source = tiny_model_dir(tmp, "llama", default_model_path)
    return {
        "block": write_fp8_folders(source, tmp, "block", BLOCK, kv_scales=True),
        "tensor": write_fp8_folders(source, tmp, "tensor"),
        "channel": write_fp8_folders(source, tmp, "channel"),
    }


def _build(model_dir: str, rank: int = 0, size: int = 1, quantization=None):
    config = read_model_config(model_dir)
    return build_model(config, "auto", model_dir, torch.float32, CPU, 0, TPGroup(rank, size), False, quantization)


def _dequantized(layer) -> torch.Tensor:
    return dequantize(layer.weight, layer.weight_scale, torch.float32, layer.fp8.block)


@pytest.mark.parametrize("scheme", ["block", "tensor", "channel"])
def test_fp8_folder_loads_fp8_layers_equal_to_the_dequantized_model(folders, scheme):
    fp8_dir, ref_dir = folders[scheme]
    model, ref = _build(fp8_dir), _build(ref_dir)
    for layer, ref_layer in zip(model.model.layers, ref.model.layers):
        for module in LAYER_MODULES.values():
            ours, theirs = layer.get_submodule(module), ref_layer.get_submodule(module)
            assert ours.weight.dtype == FP8 and ours.fp8.block == (BLOCK if scheme == "block" else None)
            assert torch.equal(_dequantized(ours), theirs.weight), module
    assert model.model.embed_tokens.weight.dtype == torch.float32  # only the linear layers are FP8
    assert model.kv_scales == ({0: [0.5, 0.25], 1: [0.5, 0.25]} if scheme == "block" else {})


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_tp2_shards_weights_with_their_scales(folders, scheme):
    fp8_dir, ref_dir = folders[scheme]
    ref = _build(ref_dir)
    shards = [_build(fp8_dir, rank, 2) for rank in range(2)]
    head = 16
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # row-parallel: the ranks' columns side by side
        full = ref.model.layers[0].get_submodule(name).weight
        joined = torch.cat([_dequantized(s.model.layers[0].get_submodule(name)) for s in shards], dim=1)
        assert torch.equal(joined, full), name
    q, k, v = ref.model.layers[0].self_attn.qkv_proj.weight.split([4 * head, 2 * head, 2 * head])
    for rank, shard in enumerate(shards):  # column-parallel: each rank's heads of q, k and v
        local = _dequantized(shard.model.layers[0].self_attn.qkv_proj)
        rows = slice(rank * 2 * head, (rank + 1) * 2 * head)
        kv_rows = slice(rank * head, (rank + 1) * head)
        assert torch.equal(local, torch.cat([q[rows], k[kv_rows], v[kv_rows]]))


@pytest.mark.parametrize("scheme", ["block", "tensor", "channel"])
def test_fused_fp8_tensors_load_with_their_scales(tmp_path, default_model_path, scheme):
    """Phi-3 stores q|k|v and gate|up as one tensor each, with one scale (per tensor), one per row of the
    fused tensor, or its blocks: whole at tp=1, and each rank's rows of each part at tp=2."""
    source = tiny_model_dir(tmp_path, "phi3", default_model_path, pad_token_id=0)
    fp8_dir, ref_dir = write_fp8_folders(source, tmp_path, scheme, BLOCK if scheme == "block" else None)
    ref = _build(ref_dir)
    for module in LAYER_MODULES.values():
        ours = _build(fp8_dir).model.layers[0].get_submodule(module)
        assert torch.equal(_dequantized(ours), ref.model.layers[0].get_submodule(module).weight), module
    head = 16
    q, k, v = ref.model.layers[1].self_attn.qkv_proj.weight.split([4 * head, 2 * head, 2 * head])
    for rank in range(2):
        local = _dequantized(_build(fp8_dir, rank, 2).model.layers[1].self_attn.qkv_proj)
        kv_rows = slice(rank * head, (rank + 1) * head)
        expected = torch.cat([q[rank * 2 * head : (rank + 1) * 2 * head], k[kv_rows], v[kv_rows]])
        assert torch.equal(local, expected)


def test_block_edges_must_fall_between_ranks(tmp_path, default_model_path):
    """kv heads of 16 rows each at tp=2, blocks of 32 rows: a rank's rows would cut a block."""
    source = tiny_model_dir(tmp_path, "llama", default_model_path)
    fp8_dir, _ = write_fp8_folders(source, tmp_path, "block", (32, 32))
    with pytest.raises(ValueError, match="do not fall on FP8 blocks of 32"):
        _build(fp8_dir, 0, 2)


def test_on_the_fly_quantization_is_per_row_and_close(folders):
    _, ref_dir = folders["channel"]
    model, ref = _build(ref_dir, quantization="fp8"), _build(ref_dir)
    for module in LAYER_MODULES.values():
        ours, theirs = model.model.layers[0].get_submodule(module), ref.model.layers[0].get_submodule(module)
        assert ours.weight.dtype == FP8 and ours.weight_scale.shape == (ours.weight.shape[0],)
        error = (_dequantized(ours) - theirs.weight).abs()
        assert (error <= _e4m3_error(theirs.weight, ours.weight_scale[:, None])).all(), module


def test_weight_update_requantizes_what_the_trainer_sends(folders):
    fp8_dir, _ = folders["block"]
    model = _build(fp8_dir)
    layer = model.model.layers[1].self_attn.o_proj
    new = torch.randn(64, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        before = layer(x)
    update_from_tensors(model, [("model.layers.1.self_attn.o_proj.weight", new)])
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (4, 2)  # still FP8, still in blocks
    block_scale = layer.weight_scale.repeat_interleave(16, 0).repeat_interleave(32, 1)
    assert ((_dequantized(layer) - new.float()).abs() <= _e4m3_error(new.float(), block_scale)).all()
    with torch.inference_mode():  # the CPU kernel's dequantized copy was remade
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, x @ _dequantized(layer).T, atol=1e-5)
    read = read_weight(model, TPGroup(), "model.layers.1.self_attn.o_proj.weight", 64)  # as a trainer reads it
    assert torch.equal(torch.tensor(read), _dequantized(layer))
    with pytest.raises(UpdateRefused, match="send bf16/fp16/fp32 weights"):  # FP8 bits without their scale
        update_from_tensors(model, [("model.layers.1.self_attn.o_proj.weight", new.to(FP8))])


def test_norms_and_activation_quantize_for_fp8_projections_where_they_multiply_in_fp8(folders, monkeypatch):
    """The kernels before an FP8 projection write its input quantized (out_fp8) exactly where that projection
    multiplies on FP8 tensor cores: a bf16 model on a device that has them (patched in here: the CPU has none;
    the fused kernels themselves run on CUDA only), not on the CPU's dequantizing fallback, nor without FP8."""
    _, ref_dir = folders["channel"]
    config = read_model_config(ref_dir)

    def flags(quantization):
        model = build_model(config, "auto", ref_dir, torch.bfloat16, CPU, 0, TPGroup(), False, quantization)
        return {
            (layer.input_layernorm.out_fp8, layer.post_attention_layernorm.out_fp8, layer.mlp.act.out_fp8)
            for layer in model.model.layers
        }

    assert flags("fp8") == {(False, False, False)}  # this CPU: no FP8 matmuls
    for module in ("scheduler_proc.loader", "scheduler_proc.layers.fp8_linear"):
        monkeypatch.setattr(f"{module}.fp8_matmul_supported", lambda device: True)
    assert flags("fp8") == {(True, True, True)}
    assert flags(None) == {(False, False, False)}


def test_refused_methods_are_named():
    for method in ("awq", "gptq", "bitsandbytes", "compressed-tensors"):
        config = {"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": method}}
        with pytest.raises(ValueError, match=f"'{method}'"):
            fp8_scheme(config)
    with pytest.raises(ValueError, match="quantization must be one of"):
        fp8_scheme({}, "int4")
    assert fp8_scheme({}, None) is None and not fp8_scheme({}, "fp8").from_checkpoint
    block = {"quant_method": "fp8", "weight_block_size": [128, 128], "ignored_layers": ["lm_head"]}
    scheme = fp8_scheme({"quantization_config": block})
    assert scheme.from_checkpoint and scheme.weight_block_size == (128, 128) and scheme.ignored_layers == ("lm_head",)


def test_fp8_kv_pool_halves_bytes_and_stores_scaled_e4m3():
    bf16 = KVPool.bytes_per_token(2, 2, 16, torch.bfloat16)
    assert KVPool.bytes_per_token(2, 2, 16, FP8) * 2 == bf16
    pool = KVPool(2, 8, 2, 16, FP8, CPU, 2, 8, compute_dtype=torch.bfloat16)
    pool.set_kv_scales({1: [0.5, 0.25]})
    assert pool.is_fp8 and pool.kv_scales == [(1.0, 1.0), (0.5, 0.25)]
    k = torch.randn(3, 2, 16)
    stored = pool.to_pool_dtype(k, 0.5)
    assert stored.dtype == FP8 and torch.equal(stored.float(), (k / 0.5).to(FP8).float())
    assert math.isclose(pool.bytes, 2 * 2 * 8 * 2 * 16)
    # A bf16 pool stores keys and values unscaled: an FP8 checkpoint's KV scales must not reach its readers.
    plain = KVPool(2, 8, 2, 16, torch.bfloat16, CPU, 2, 8)
    plain.set_kv_scales({1: [0.5, 0.25]})
    assert plain.kv_scales == [(1.0, 1.0), (1.0, 1.0)] and torch.equal(plain.to_pool_dtype(k, 0.5), k)
