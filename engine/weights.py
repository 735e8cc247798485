"""The Engine's methods for RL trainers, with SGLang's names and return shapes: push new weights (from
tensors, a folder, or the trainer's process group), read a weight back, and hand the device memory
back between rollouts. `Engine` inherits them; they run in the scheduler between two steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Union

from engine.shared.errors import EngineError, short_repr
from engine.shared.weight_protocol import (
    MEMORY_TAGS,
    DestroyWeightsUpdateGroup,
    GetWeightsByName,
    InitWeightsUpdateGroup,
    ReleaseMemory,
    ResumeMemory,
    TrainerOp,
    UpdateFromDisk,
    UpdateFromDistributed,
    UpdateFromTensor,
    op_name,
)

if TYPE_CHECKING:
    import torch

    from engine.loop_thread import LoopThread
    from engine.shared.args import EngineArgs
    from tokenizer_proc.manager import TokenizerManager

NamedTensors = Union[Iterable[tuple[str, "torch.Tensor"]], Mapping[str, "torch.Tensor"]]


class TrainerMethods:
    """Weight updates and memory release for an Engine embedded in a trainer (verl, OpenRLHF, slime...).

    Every update happens between two scheduler steps. Requests in flight continue with the new weights:
    with flush_cache (the default) the prefix cache is emptied and running requests compute their KV
    afresh with the new weights (keeping the tokens they generated), so no KV computed by the old
    weights is reused; with flush_cache=False they keep their old KV and the cache keeps its entries.
    An update that does not fit the model (an unknown name, a wrong shape or dtype, a folder that is not
    a checkpoint of it) changes nothing and returns (False, a message naming it); the engine keeps
    serving. Mistakes in the call itself (wrong types, a bad load_format) raise TypeError / ValueError.
    """

    args: EngineArgs  # Engine's attributes and method, which these methods use
    _loop: LoopThread
    _manager: TokenizerManager
    _check_open: Callable[[], None]

    def update_weights_from_tensor(
        self, named_tensors: NamedTensors, load_format: Optional[str] = None, flush_cache: bool = True
    ) -> tuple[bool, str]:
        """Copy (name, tensor) pairs into the model: Hugging Face parameter names and shapes (as in the
        model's safetensors), any subset of the weights, any floating dtype (cast to the engine's).
        ferry fuses q|k|v and gate|up and shards over tensor-parallel ranks itself. CUDA tensors are
        opened in place by every rank (CUDA IPC, no copy through the host); CPU tensors are sent as
        bytes. The tensors must stay unchanged until this returns. Returns (success, message)."""
        from engine.shared.tensor_wire import to_wire

        self._check_open()
        if load_format not in (None, "direct"):
            raise ValueError(f"load_format must be None (or 'direct'), got {load_format!r}")
        pairs = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise TypeError(f"named_tensors[{i}] must be a (name, tensor) pair, got {short_repr(pair)}")
            if not _is_tensor(pair[1]):
                raise TypeError(f"named_tensors[{i}] ({pair[0]!r}) must hold a torch.Tensor, got {short_repr(pair[1])}")
        on_cuda = self.args.device == "cuda"
        tensors = [to_wire(name, tensor, self.args.tp_size, cuda_ipc=on_cuda) for name, tensor in pairs]
        return self._trainer_call(UpdateFromTensor(tensors=tensors, flush_cache=bool(flush_cache)))

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> tuple[bool, str]:
        """Load every weight from another folder holding a checkpoint of the same model (same
        architecture and shapes, safetensors). The prefix cache is flushed. Returns (success, message)."""
        self._check_open()
        if not isinstance(model_path, str):
            raise TypeError(f"model_path must be a str, got {model_path!r}")
        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format must be None, 'auto' or 'safetensors', got {load_format!r}")
        return self._trainer_call(UpdateFromDisk(model_path=model_path))

    def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "nccl",
    ) -> tuple[bool, str]:
        """Join the trainer's torch.distributed group (the trainer is rank 0, at
        tcp://master_address:master_port; tensor-parallel rank r joins as rank_offset + r), exactly as
        SGLang's init_custom_process_group makes it; with dp_size replicas, rank r of replica i joins as
        rank_offset + i * tp_size + r. Blocks until every rank has joined, so the trainer
        joins from another thread or process at the same time. With NCCL the trainer needs a GPU that
        none of the engine's ranks uses (NCCL puts no two ranks of a group on one GPU); a trainer on the
        engine's GPUs uses update_weights_from_tensor. Returns (success, message)."""
        self._check_open()
        _check_int("master_port", master_port, 1)
        _check_int("rank_offset", rank_offset, 1)
        _check_int("world_size", world_size, rank_offset + self.args.dp_size * self.args.tp_size)
        if not isinstance(master_address, str) or not isinstance(group_name, str):
            raise TypeError("master_address and group_name must be str")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl" and self.args.device != "cuda":
            raise ValueError(f"backend 'nccl' needs the engine on cuda (device={self.args.device!r}); use 'gloo'")
        op = InitWeightsUpdateGroup(master_address, master_port, rank_offset, world_size, group_name, backend)
        return self._trainer_call(op)

    def destroy_weights_update_group(self, group_name: str) -> tuple[bool, str]:
        """Leave a group joined with init_weights_update_group (every rank destroys its side), as a trainer
        does before it exits or starts over: a group whose trainer has gone keeps its communicator (and, with
        NCCL, a watchdog that logs the missing store) until then. The name may then be joined again.
        Returns (success, message)."""
        self._check_open()
        if not isinstance(group_name, str):
            raise TypeError(f"group_name must be a str, got {group_name!r}")
        return self._trainer_call(DestroyWeightsUpdateGroup(group_name))

    def update_weights_from_distributed(
        self, names: list[str], dtypes: list[Any], shapes: list[list[int]], group_name: str, flush_cache: bool = True
    ) -> tuple[bool, str]:
        """Receive weights the trainer (rank 0 of group_name) broadcasts, one tensor per name in this
        order, with these dtypes (torch dtypes or their names) and shapes; every rank takes its shard.
        The trainer broadcasts at the same time, from another thread or process. Returns (success, message)."""
        from engine.shared.tensor_wire import dtype_from_name, dtype_name

        self._check_open()
        if not (len(names) == len(dtypes) == len(shapes)):
            raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
        dtype_names = [d if isinstance(d, str) else dtype_name(d) for d in dtypes]
        for i, dtype in enumerate(dtype_names):
            try:
                dtype_from_name(dtype)
            except ValueError as exc:
                raise ValueError(f"dtypes[{i}]: {exc}") from None
        shape_lists = [[int(n) for n in shape] for shape in shapes]
        op = UpdateFromDistributed(list(names), dtype_names, shape_lists, group_name, bool(flush_cache))
        return self._trainer_call(op)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list[Any]:
        """The weight of this Hugging Face name as the engine holds it (joined over tensor-parallel
        ranks): its first truncate_size entries along the first dimension, as (nested) lists of float,
        like `hf_model.get_parameter(name)[:truncate_size].tolist()`. ValueError for an unknown name."""
        self._check_open()
        _check_int("truncate_size", truncate_size, 0)
        payload = self._trainer_payload(GetWeightsByName(name=name, truncate_size=truncate_size))
        if not payload["success"]:
            raise ValueError(f"get_weights_by_name: {payload['message']}")
        return payload["values"]

    def release_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        """Hand the device memory back: with tags None, all of it ("weights": to pinned host memory,
        "kv_cache", "cuda_graph"). Running requests go back to waiting; they, and any request sent
        meanwhile, are held (not failed) until resume_memory_occupation. The prefix cache is emptied."""
        self._check_open()
        self._trainer_call(ReleaseMemory(tags=_memory_tags(tags)), raise_failure=True)

    def resume_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory of `tags` (None: all) back; the weights are as they were released, the CUDA
        graphs are captured again, and held requests run once the weights and the KV cache are back."""
        self._check_open()
        self._trainer_call(ResumeMemory(tags=_memory_tags(tags)), raise_failure=True)

    def _trainer_call(self, op: TrainerOp, raise_failure: bool = False) -> tuple[bool, str]:
        payload = self._trainer_payload(op)
        if raise_failure and not payload["success"]:
            raise EngineError(f"{op_name(op)} failed: {payload['message']}")
        return payload["success"], payload["message"]

    def _trainer_payload(self, op: TrainerOp) -> dict[str, Any]:
        # No timeout: joining a group waits for the trainer, and a large update takes its time; if the
        # scheduler dies meanwhile, the call fails at once.
        return self._loop.run(self._manager.call(op_name(op), timeout=None, args=op))


def _memory_tags(tags: Optional[list[str]]) -> list[str]:
    if tags is None:
        return list(MEMORY_TAGS)
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise TypeError(f"tags must be a list of str, got {tags!r}")
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ValueError(f"tags {unknown} are not memory kinds; use some of {list(MEMORY_TAGS)}")
    return list(tags)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)
