"""What ferry runs: the architectures it has, the config.json settings it honours, and which layers attend
through a sliding window. A config ferry would run wrongly (an architecture it lacks, a RoPE scaling or an
activation it would ignore) is refused when the engine starts, with an error naming what is wrong and
listing what is supported. Imported by the frontend (to refuse early) and by the scheduler (to build).
"""

from __future__ import annotations

from typing import Any, Optional

from engine.shared.quant_config import fp8_scheme

ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration",
)
"""config.json `architectures[0]` values ferry runs (scheduler_proc/models/registry.py builds them)."""

_ROPE_TYPES = ("default", "linear", "llama3")
_EXTRA_ROPE_TYPES = {"Phi3ForCausalLM": ("longrope", "su"), "Qwen2_5_VLForConditionalGeneration": ("mrope",)}
_GELU_TANH = ("gelu_pytorch_tanh",)
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_LAYER_TYPES = ("full_attention", "sliding_attention")
# Architectures whose HF implementation applies `sliding_window` to every layer when it is set.
_WINDOW_EVERYWHERE = ("MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM")
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2_5_VLForConditionalGeneration")


def architecture(config: dict[str, Any]) -> str:
    return (config.get("architectures") or [""])[0]


def check_model_config(config: dict[str, Any]) -> None:
    """Raise ValueError when ferry would not run this model as its config says."""
    arch = architecture(config)
    if arch not in ARCHITECTURES:
        raise ValueError(f"model architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}")
    fp8_scheme(config)  # refuses every quantization method but FP8
    supported = _ROPE_TYPES + _EXTRA_ROPE_TYPES.get(arch, ())
    for kind in rope_types(config):
        if kind not in supported:
            raise ValueError(f"{arch}: rope_scaling type {kind!r} is not supported; supported: {list(supported)}")
    for params in _rope_dicts(config):
        factor = float(params.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise ValueError(f"{arch}: partial_rotary_factor {factor} is not supported (only 1.0)")
    activation, allowed = _activation(config, arch)
    if activation not in allowed:
        raise ValueError(f"{arch}: activation {activation!r} is not supported; supported: {list(allowed)}")
    unknown = sorted(set(config.get("layer_types") or []) - set(_LAYER_TYPES))
    if unknown:
        raise ValueError(f"{arch}: layer_types {unknown} are not supported; supported: {list(_LAYER_TYPES)}")
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"{arch}: use_bidirectional_attention is not supported (causal attention only)")
    windows = layer_windows(config)
    if any(w is not None and (not isinstance(w, int) or w <= 0) for w in windows):
        raise ValueError(f"{arch}: sliding_window must be a positive int, got {config.get('sliding_window')!r}")


def layer_windows(config: dict[str, Any]) -> list[Optional[int]]:
    """Per layer, how many keys a query sees (itself and the window - 1 before it), or None for all of
    them: as HF transformers reads `layer_types`, `sliding_window`, `use_sliding_window` and each
    family's default pattern."""
    arch, n = architecture(config), int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if arch in _QWEN and not config.get("use_sliding_window", False):
        return [None] * n  # HF's Qwen configs drop the window unless use_sliding_window
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    if window is None:
        return [None] * n
    if arch == "Gemma2ForCausalLM":  # even layers local, odd global
        return [window if (i + 1) % 2 else None for i in range(n)]
    if arch == "Gemma3ForCausalLM":  # every sliding_window_pattern-th layer global
        pattern = int(config.get("sliding_window_pattern", 6))
        return [window if (i + 1) % pattern else None for i in range(n)]
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        first = int(config.get("max_window_layers", n))
        return [window if i >= first else None for i in range(n)]
    if arch in _WINDOW_EVERYWHERE or arch == "Qwen3MoeForCausalLM":
        return [window] * n
    return [None] * n  # Llama's HF implementation has no window


def rope_types(config: dict[str, Any]) -> set[str]:
    """Every RoPE type the config asks for (Gemma 3 may give one per layer type)."""
    return {p.get("rope_type") or p.get("type") or "default" for p in _rope_dicts(config)}


def _rope_dicts(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The RoPE settings: legacy `rope_scaling`, or transformers 5's `rope_parameters` (flat, or one
    dict per layer type)."""
    found = []
    if config.get("rope_scaling"):
        found.append(config["rope_scaling"])
    params = config.get("rope_parameters") or {}
    if params and not any(isinstance(v, dict) for v in params.values()):
        found.append(params)
    else:
        found += [v for v in params.values() if isinstance(v, dict)]
    return found


def _activation(config: dict[str, Any], arch: str) -> tuple[str, tuple[str, ...]]:
    if arch in _GEMMA:  # HF's Gemma reads hidden_activation; older configs only have hidden_act
        return config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh", _GELU_TANH
    return config.get("hidden_act", "silu"), ("silu",)
