"""Shared fixtures: the default model's folder, HF reference models, and a greedy reference decoder."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from engine.shared.model_files import resolve_model_path

    return resolve_model_path(None)


@pytest.fixture(scope="session")
def hf_default_model(default_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)
