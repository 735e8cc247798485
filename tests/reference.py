"""HF transformers as the judge: greedy ids and logprobs computed the plain way."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, input_ids: list[int], num_tokens: int, **prompt_kwargs) -> list[int]:
    """Greedy continuation, never stopping at EOS (compare with ignore_eos=True); prompt_kwargs go
    to the prompt's forward only (a VL model's pixels)."""
    ids = torch.tensor([input_ids])
    out = model(ids, use_cache=True, **prompt_kwargs)
    generated = []
    for _ in range(num_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


@torch.inference_mode()
def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of ids: [len(ids), vocab]."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def tiny_model_dir(tmp_path, arch: str, tokenizer_dir: str, **overrides) -> str:
    """A random-weight HF model of the given architecture saved with the default model's tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    kinds = {
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "phi3": "Phi3ForCausalLM",
        "gemma2": "Gemma2ForCausalLM",
        "gemma3_text": "Gemma3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM",
    }
    settings = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        architectures=[kinds[arch]],
    )
    if arch == "qwen3":
        settings["head_dim"] = 32
    settings.update(overrides)
    config = AutoConfig.for_model(arch, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-init weights so that tokens differ by position and content
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    out = tmp_path / arch
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        src = f"{tokenizer_dir}/{name}"
        try:
            shutil.copy(src, out / name)
        except FileNotFoundError:
            pass
    return str(out)


def assert_pool_free(engine, timeout: float = 30.0) -> dict:
    """Wait until the engine is idle, then assert that no KV slot leaked: the free slots plus the prefix
    cache's evictable ones make the whole pool. Returns the last server_info.

    Use this instead of `kv_free_tokens == kv_pool_tokens`: with the prefix cache on (the default),
    finished requests leave their KV in the cache. A finished request's last output can reach the
    caller a moment before its scheduler bookkeeping is visible, hence the wait.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        info = engine.get_server_info()
        idle = info["num_running"] == 0 and info["num_waiting"] == 0
        if idle and info["kv_free_tokens"] + info["kv_cached_tokens"] == info["kv_pool_tokens"]:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(
                f"KV slots leaked or engine busy: free {info['kv_free_tokens']} + cached "
                f"{info['kv_cached_tokens']} != pool {info['kv_pool_tokens']} "
                f"(running {info['num_running']}, waiting {info['num_waiting']})"
            )
        time.sleep(0.05)
