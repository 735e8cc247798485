"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

from scheduler_proc.models.decoder import ARCHITECTURES as DECODERS
from scheduler_proc.models.decoder import CausalLM
from scheduler_proc.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

ARCHITECTURES: dict[str, type[CausalLM]] = {
    **DECODERS,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}
