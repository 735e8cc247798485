"""Architecture name (config.json's `architectures[0]`) -> model class: every model ferry runs."""

from __future__ import annotations

from engine.shared.model_config import ARCHITECTURES as SUPPORTED
from scheduler_proc.models.decoder import ARCHITECTURES as DECODERS
from scheduler_proc.models.decoder import CausalLM
from scheduler_proc.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from scheduler_proc.models.mixtral import MixtralForCausalLM
from scheduler_proc.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from scheduler_proc.models.qwen3_moe import Qwen3MoeForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    **DECODERS,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}
"""Model architectures as plain torch modules over ferry's layers."""

# The frontend refuses what this table lacks by the shared list: the two must name the same models.
assert set(ARCHITECTURES) == set(SUPPORTED), set(ARCHITECTURES) ^ set(SUPPORTED)
