"""Issue 23 on the device (`make test-gpu`): GPU tensors of this process reach the engine through CUDA IPC
and give what the same weights from disk give, with CUDA graphs on (they replay on the updated storage);
a release hands back at least 90% of the engine's GPU memory and a resume restores its outputs; with two
GPUs, the trainer's broadcast over NCCL (trainer on cuda:0, engine on cuda:1)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from gpu_reference import CONFIGS  # noqa: E402
from trainer_reference import broadcast_all, free_port, trainer_group  # noqa: E402

MODEL = os.path.join(CONFIGS, "qwen2.5-0.5b")
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [100, 2000, 30], [4242] * 9]


def model_b(device: str) -> list[tuple[str, torch.Tensor]]:
    """Every weight of the model under its HF name, new random bf16 values (a trainer's tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL))
    generator = torch.Generator(device=device).manual_seed(5)
    named = []
    for name, param in skeleton.state_dict().items():
        tensor = torch.empty(param.shape, dtype=torch.bfloat16, device=device)
        named.append((name, tensor.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)))
    return named


def outputs(engine) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def start(**settings):
    from engine import Engine

    return Engine(MODEL, load_format="dummy", context_length=4096, mem_fraction_static=0.5, **settings)


def test_ipc_update_equals_disk_and_release_hands_memory_back(tmp_path):
    from safetensors.torch import save_file

    free_at_start = torch.cuda.mem_get_info(0)[0]
    with start() as engine:
        footprint = free_at_start - torch.cuda.mem_get_info(0)[0]
        a_ids = outputs(engine)
        named = model_b("cuda:0")
        assert engine.update_weights_from_tensor(named)[0]
        b_ids = outputs(engine)
        assert b_ids != a_ids  # the CUDA graphs read the new weights
        name, tensor = named[5]
        assert torch.equal(torch.tensor(engine.get_weights_by_name(name, 4)), tensor[:4].float().cpu())
        save_file({n: t.cpu() for n, t in named}, str(tmp_path / "model.safetensors"))
        with open(os.path.join(MODEL, "config.json")) as f:
            (tmp_path / "config.json").write_text(f.read())
        assert engine.update_weights_from_disk(str(tmp_path))[0]
        assert outputs(engine) == b_ids
        del named
        torch.cuda.empty_cache()

        free_before = torch.cuda.mem_get_info(0)[0]
        engine.release_memory_occupation()
        handed_back = torch.cuda.mem_get_info(0)[0] - free_before
        assert handed_back >= 0.9 * footprint, (handed_back / 2**30, footprint / 2**30)
        engine.resume_memory_occupation()
        assert engine.get_server_info()["cuda_graph_batch_sizes"]
        assert outputs(engine) == b_ids


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the trainer and the engine need a GPU each")
def test_update_from_distributed_over_nccl():
    group_name, port = "gpu-weights", free_port()
    torch.cuda.set_device(0)
    with start(base_gpu_id=1) as engine, ThreadPoolExecutor(1) as pool:
        joined = pool.submit(engine.init_weights_update_group, "127.0.0.1", port, 1, 2, group_name)
        group = trainer_group(port, 2, group_name, backend="nccl")
        assert joined.result(timeout=300)[0]
        named = model_b("cuda:0")
        names, tensors = [n for n, _ in named], [t for _, t in named]
        call = pool.submit(
            engine.update_weights_from_distributed,
            names,
            [t.dtype for t in tensors],
            [list(t.shape) for t in tensors],
            group_name,
        )
        broadcast_all(group, tensors)
        assert call.result(timeout=300)[0]
        via_nccl = outputs(engine)
        assert engine.update_weights_from_tensor([(n, t.cpu()) for n, t in named])[0]
        assert outputs(engine) == via_nccl
        assert engine.destroy_weights_update_group(group_name)[0]
        torch.distributed.destroy_process_group(group)
