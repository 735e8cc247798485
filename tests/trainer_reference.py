"""The trainer's side of weight updates, for the tests: a second checkpoint of a tiny model, and a
process group made the way SGLang's `init_custom_process_group` makes it (which RL trainers use to
reach SGLang's engine), written here from its description so that the engine is checked against it."""

from __future__ import annotations

import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path

import torch

# Every process of these tests is on this host: gloo over loopback (the engine's children inherit it).
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def variant_dir(model_dir: str, out: Path, seed: int) -> str:
    """Model B: model_dir's config and tokenizer with other random weights (as tiny_model_dir draws them)."""
    model = hf_model(model_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.empty(param.shape).normal_(0.0, 0.2, generator=generator))
            else:  # norms and biases too, so that every kind of tensor differs between A and B
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors") and not (out / name).exists():
            shutil.copy(os.path.join(model_dir, name), out / name)
    return str(out)


def hf_model(model_dir: str):
    """The folder's model in float32, by the class its config names (a VL model's too)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainer_group(port: int, world_size: int, group_name: str, backend: str = "gloo"):
    """Rank 0 of a weight update group as SGLang's helper makes it: a rendezvous at the TCP address,
    the store prefixed by the group's name, a non-default process group of that name."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(minutes=5)
    store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_all(group, tensors: list[torch.Tensor]) -> None:
    """What the trainer does while the engine's update_weights_from_distributed call runs."""
    import torch.distributed as dist

    for tensor in tensors:
        dist.broadcast(tensor.detach().contiguous(), src=0, group=group)
