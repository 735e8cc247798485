"""Checkpoints that fuse projections: Phi-3's q|k|v and gate|up tensors, read whole at tp_size=1 and as each
rank's blocks at tp_size=2 (one KV head per rank). (A bare decoder's names without an LM head, as embedding
models are saved: tests/engine/test_embeddings.py.)"""

from __future__ import annotations

import torch
from reference import tiny_model_dir
from safetensors.torch import load_file

from engine.shared.args import read_model_config
from scheduler_proc.loader import build_model
from scheduler_proc.tp.group import TPGroup


def test_phi3_fused_tensors_load_whole_and_per_rank(tmp_path, default_model_path):
    model_dir = tiny_model_dir(tmp_path, "phi3", default_model_path, pad_token_id=0)
    config = read_model_config(model_dir)
    checkpoint = load_file(f"{model_dir}/model.safetensors")

    def build(rank: int, size: int):
        return build_model(config, "auto", model_dir, torch.float32, torch.device("cpu"), 0, TPGroup(rank, size))

    full, shards = build(0, 1), [build(rank, 2) for rank in range(2)]
    qkv = checkpoint["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(full.model.layers[0].self_attn.qkv_proj.weight, qkv)
    assert torch.equal(
        full.model.layers[0].mlp.gate_up_proj.weight, checkpoint["model.layers.0.mlp.gate_up_proj.weight"]
    )
    head = config["hidden_size"] // config["num_attention_heads"]
    q, k, v = qkv.split([4 * head, 2 * head, 2 * head])  # 4 query heads, 2 KV heads
    for rank, shard in enumerate(shards):
        rows = slice(rank * 2 * head, (rank + 1) * 2 * head)
        expected = torch.cat([q[rows], k[rank * head : (rank + 1) * head], v[rank * head : (rank + 1) * head]])
        assert torch.equal(shard.model.layers[0].self_attn.qkv_proj.weight, expected)
        gate, up = checkpoint["model.layers.0.mlp.gate_up_proj.weight"].chunk(2)
        half = gate.shape[0] // 2
        expected_mlp = torch.cat([gate[rank * half : (rank + 1) * half], up[rank * half : (rank + 1) * half]])
        assert torch.equal(shard.model.layers[0].mlp.gate_up_proj.weight, expected_mlp)
