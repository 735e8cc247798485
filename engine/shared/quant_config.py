"""Which weights are FP8, read once from the settings and config.json: `quantization="fp8"` quantizes a
bf16/fp16 checkpoint as it loads; a folder whose `quantization_config` says `quant_method: "fp8"` holds
FP8 weights and their scales (per tensor, per output channel, or per `weight_block_size` block). Any other
quantization method (AWQ, GPTQ, bitsandbytes, compressed-tensors, ...) is refused by name. Imported by
the frontend (to refuse at start-up) and by the scheduler (to build the layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

QUANTIZATIONS = ("fp8",)
"""Values of EngineArgs.quantization (and of a checkpoint's quant_method) ferry runs."""

KV_CACHE_DTYPES = ("auto", "fp8_e4m3")
"""Values of EngineArgs.kv_cache_dtype: auto (the model's dtype) or FP8 e4m3."""


@dataclass(frozen=True)
class Fp8Scheme:
    """How a model's linear layers hold FP8 weights."""

    from_checkpoint: bool  # the folder holds FP8 tensors and scales (else: quantized while loading)
    weight_block_size: Optional[tuple[int, int]] = None  # scales per block of rows x columns; None: per row
    ignored_layers: tuple[str, ...] = ()  # checkpoint module names left in high precision


def fp8_scheme(config: dict[str, Any], quantization: Optional[str] = None) -> Optional[Fp8Scheme]:
    """The FP8 scheme of a model (None: no FP8 weights); ValueError for a method ferry does not run."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or None, got {quantization!r}")
    found = config.get("quantization_config")
    if not found:
        return Fp8Scheme(from_checkpoint=False) if quantization == "fp8" else None
    arch = (config.get("architectures") or ["?"])[0]
    method = found.get("quant_method", "?")
    if method != "fp8":
        raise ValueError(
            f"{arch}: quantized checkpoints (quantization_config quant_method {method!r}) are not supported; "
            f"supported: {list(QUANTIZATIONS)}"
        )
    if found.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{arch}: FP8 format {found['fmt']!r} is not supported; supported: ['e4m3']")
    block = found.get("weight_block_size")
    if block is not None and (len(block) != 2 or any(int(b) <= 0 for b in block)):
        raise ValueError(f"{arch}: weight_block_size must be two positive ints, got {block!r}")
    ignored = found.get("ignored_layers") or found.get("modules_to_not_convert") or ()
    return Fp8Scheme(True, tuple(int(b) for b in block) if block else None, tuple(ignored))
