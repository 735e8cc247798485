"""Issue 20: every model family ferry runs gives HF transformers' own greedy tokens, on tiny random models
(float32) built by HF's classes: a batch holding a prompt longer than the sliding window, prefilled in
chunks that cross the window's edge, then the same batch again from the prefix cache; the
mixture-of-experts models also with tensor parallelism over gloo (tp_size=2)."""

from __future__ import annotations

import pytest
import torch
from reference import assert_pool_free, hf_greedy, tiny_model_dir

from engine import Engine

WINDOW = 16  # keys a query sees in a local layer: the long prompt spans five windows
CHUNK = 24  # prefill tokens per step: chunk edges fall inside windows
NEW_TOKENS = 8
PROMPTS = [
    [(37 * i + 11) % 1000 for i in range(80)],  # longer than the window: decode reads a window of its end
    [5, 6, 7, 8, 9],
    [(37 * i + 11) % 1000 for i in range(50)] + [901, 902, 903],  # shares 50 tokens with the first
    [(13 * i + 400) % 1000 for i in range(30)],
]
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
SMALL = {"max_total_tokens": 2048, "max_running_requests": 8, "chunked_prefill_size": CHUNK}
_LONGROPE = {  # Phi-3's scaling, with an original length above every test sequence (HF then uses the short factors)
    "type": "longrope",
    "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
    "long_factor": [2.0] * 8,
}
FAMILIES = {  # HF model_type -> settings beyond reference.tiny_model_dir's
    "mistral": {"sliding_window": WINDOW},
    "phi3": {
        "sliding_window": WINDOW,
        "pad_token_id": 0,
        "rope_scaling": _LONGROPE,
        "original_max_position_embeddings": 256,
    },
    "gemma2": {
        "head_dim": 16,
        "sliding_window": WINDOW,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 20.0,
        "final_logit_softcapping": 15.0,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "head_dim": 16,
        "num_hidden_layers": 3,  # local, local, global
        "sliding_window": WINDOW,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 24,
        "rope_local_base_freq": 100.0,
        "tie_word_embeddings": True,
    },
    "qwen3_moe": {
        "head_dim": 16,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],  # a dense layer between two sparse ones
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW},
}
MIXTURES = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, default_model_path) -> tuple[str, str, list[list[int]]]:
    """(model type, tiny model folder, HF's greedy tokens for PROMPTS)."""
    from transformers import AutoModelForCausalLM

    kind = request.param
    model_dir = tiny_model_dir(tmp_path_factory.mktemp(kind), kind, default_model_path, **FAMILIES[kind])
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return kind, model_dir, [hf_greedy(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]


def _check(engine: Engine, expected: list[list[int]]) -> None:
    """The batch twice: computed, then from the prefix cache; HF's tokens both times, no KV slot leaked."""
    first = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    again = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in first] == expected
    assert [o["output_ids"] for o in again] == expected
    assert again[0]["meta_info"]["cached_tokens"] >= len(PROMPTS[0]) - 1  # the second round reused the KV
    assert_pool_free(engine)


def test_greedy_tokens_equal_hf(family):
    kind, model_dir, expected = family
    tp_size = 2 if kind in MIXTURES else 1  # the experts sharded over two ranks (tp_size=1: test_moe.py)
    with Engine(model_dir, tp_size=tp_size, **SMALL) as engine:
        info = engine.get_server_info()
        assert info["tp_size"] == tp_size and info["decode_attention_backend"] == "torch"  # on the CPU
        _check(engine, expected)
