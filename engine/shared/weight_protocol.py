"""The messages of a trainer's calls (weight updates, weight reads, memory release), carried as the
`args` of a ControlRequest and answered by a ControlReply whose payload is an OpResult.

Names follow SGLang's Engine methods (update_weights_from_tensor, ...), so the op string of each call
is its method's name. Tensors cross as raw bytes (CPU) or as CUDA IPC handles (GPU): no pickle.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec


class CudaIpcTensor(msgspec.Struct, array_like=True):
    """A GPU tensor of the caller's process, opened in place by another process: what torch's
    `reduce_tensor` shares of it (its CUDA allocation's handle and where the tensor sits in it)."""

    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: Optional[bytes]
    event_sync_required: bool
    stride: list[int]
    offset: int  # elements from the storage's start


class NamedTensor(msgspec.Struct):
    """One tensor of an update, under its checkpoint (Hugging Face) name."""

    name: str
    shape: list[int]
    dtype: str  # torch's name: "float32", "bfloat16", ...
    data: Optional[bytes] = None  # a CPU tensor's values, row-major
    cuda_ipc: list[CudaIpcTensor] = []  # a GPU tensor: one handle per tensor-parallel rank (each opens its own)


class UpdateFromTensor(msgspec.Struct, tag="update_weights_from_tensor"):
    tensors: list[NamedTensor]
    flush_cache: bool = True


class UpdateFromDisk(msgspec.Struct, tag="update_weights_from_disk"):
    model_path: str
    flush_cache: bool = True  # always, as SGLang does


class InitWeightsUpdateGroup(msgspec.Struct, tag="init_weights_update_group"):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's tensor-parallel rank r joins as rank_offset + r
    world_size: int
    group_name: str
    backend: str  # "nccl" or "gloo"


class DestroyWeightsUpdateGroup(msgspec.Struct, tag="destroy_weights_update_group"):
    group_name: str


class UpdateFromDistributed(msgspec.Struct, tag="update_weights_from_distributed"):
    names: list[str]
    dtypes: list[str]  # torch's names
    shapes: list[list[int]]
    group_name: str
    flush_cache: bool = True


class GetWeightsByName(msgspec.Struct, tag="get_weights_by_name"):
    name: str
    truncate_size: int


class ReleaseMemory(msgspec.Struct, tag="release_memory_occupation"):
    tags: list[str]  # of MEMORY_TAGS


class ResumeMemory(msgspec.Struct, tag="resume_memory_occupation"):
    tags: list[str]


class CaptureGraphs(msgspec.Struct, tag="capture_cuda_graphs"):
    """Not a call of its own: the second half of a resume, once every rank has its memory back."""


TrainerOp = Union[
    UpdateFromTensor,
    UpdateFromDisk,
    InitWeightsUpdateGroup,
    DestroyWeightsUpdateGroup,
    UpdateFromDistributed,
    GetWeightsByName,
    ReleaseMemory,
    ResumeMemory,
    CaptureGraphs,
]

# What release_memory_occupation hands back, as SGLang names it: the weights, the KV cache (with the
# attention's workspace), and the CUDA graphs (always released with either of the others).
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class OpResult(msgspec.Struct):
    """The answer to a trainer op, on every rank (rank 0 combines them into the reply's payload)."""

    success: bool
    message: str
    values: Optional[Any] = None  # get_weights_by_name's nested lists (rank 0)


def op_name(op: TrainerOp) -> str:
    """The call's name: its struct's tag."""
    return type(op).__struct_config__.tag
