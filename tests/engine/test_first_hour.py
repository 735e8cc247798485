"""What a newcomer meets first: errors before any work, a context length the model cannot take, start-up
lines at the default log level, and a progress bar that moves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from engine import Engine
from engine.progress import BatchProgress, wants_progress
from engine.shared.args import EngineArgs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cuda_without_cuda_fails_at_once():
    start = time.monotonic()
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        Engine(device="cuda")
    assert time.monotonic() - start < 10  # no model load, no child process first


def test_cuda_check_names_what_is_missing(monkeypatch):
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.11.0+cu130")  # a CUDA build of torch
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES='' hides every GPU"):
        EngineArgs(device="cuda").resolve()


def test_context_length_above_the_model_maximum_needs_an_opt_in():
    with pytest.raises(
        ValueError, match=r"context_length=100000 is above the model's maximum of 8192.*allow_long_context"
    ):
        EngineArgs(context_length=100000).resolve()
    assert EngineArgs(context_length=100000, allow_long_context=True).resolve().context_length == 100000
    assert EngineArgs(context_length=4096).resolve().context_length == 4096


def _start_and_stop(*settings: str) -> str:
    code = f"from engine import Engine\nEngine({', '.join(settings)}).shutdown()\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_start_up_talks_at_the_default_level_and_warning_quiets_it():
    talk = _start_and_stop()
    for line in ("starting ferry", "loading LlamaForCausalLM", "model loaded in", "KV pool:", "engine ready in"):
        assert line in talk, talk
    assert "engine ready in" not in _start_and_stop('log_level="warning"')


def test_progress_is_on_for_big_batches_on_a_terminal_only(monkeypatch):
    assert wants_progress(True, 1) and not wants_progress(False, 1000)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert wants_progress(None, 32) and not wants_progress(None, 31)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not wants_progress(None, 1000)


class _State:
    def __init__(self, prompt_tokens: int, output: int, finished: bool) -> None:
        self.prompt_tokens, self.output_ids, self.finished = prompt_tokens, [0] * output, finished


def test_progress_counts_prompts_done_and_token_rates(capsys):
    states = [_State(100, 10, True), _State(100, 5, False), _State(100, 0, False)]
    progress = BatchProgress(states)  # type: ignore[arg-type]
    progress.refresh()
    assert progress.bar.n == 1
    states[1].finished = True
    progress.close()
    err = capsys.readouterr().err
    assert "2/3" in err and "input" in err and "output" in err and "tok/s" in err


def test_the_triton_decode_kernel_is_asked_for_where_it_can_run():
    with pytest.raises(ValueError, match="decode_attention_backend must be one of"):
        EngineArgs(decode_attention_backend="fa3").validate()
    # Refused before any process starts, on the CPU or beside torch attention on any machine.
    with pytest.raises(ValueError, match="decode_attention_backend='triton' needs the GPU"):
        EngineArgs(decode_attention_backend="triton", device="cpu").resolve()
    with pytest.raises(ValueError, match="decode_attention_backend='triton' needs the GPU"):
        EngineArgs(decode_attention_backend="triton", attention_backend="torch").resolve()
    assert EngineArgs(decode_attention_backend="flashinfer").resolve().decode_attention_backend == "flashinfer"


def test_cuda_graph_max_bs_is_a_positive_int_or_none():
    EngineArgs(cuda_graph_max_bs=None).validate()  # None: graphs up to max_running_requests
    EngineArgs(cuda_graph_max_bs=512).validate()
    for bad in (0, -1, True, 2.5, "256"):
        with pytest.raises(ValueError, match="cuda_graph_max_bs must be a positive int or None"):
            EngineArgs(cuda_graph_max_bs=bad).validate()
