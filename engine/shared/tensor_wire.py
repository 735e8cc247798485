"""A tensor of the caller's process on the wire to the scheduler's ranks: a CPU tensor as its bytes, a
GPU tensor as CUDA IPC handles that each rank opens in place (no copy through the host), the way
torch.multiprocessing shares CUDA tensors (and SGLang's MultiprocessingSerializer with it).

The caller's GPU tensor must stay alive until the ranks have copied it: the engine's call returns
after the reply, which the ranks send once their copies are done.
"""

from __future__ import annotations

import torch

from engine.shared.weight_protocol import CudaIpcTensor, NamedTensor


def dtype_from_name(name: str) -> torch.dtype:
    """torch.bfloat16 from "bfloat16" (or "torch.bfloat16"); ValueError for anything else."""
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (say 'bfloat16', 'float16' or 'float32')")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_wire(name: str, tensor: torch.Tensor, num_ranks: int, cuda_ipc: bool) -> NamedTensor:
    """The message for one tensor. With cuda_ipc (the engine runs on CUDA), a GPU tensor gets one IPC
    handle per rank that will open it; otherwise it goes as bytes like a CPU tensor."""
    tensor = tensor.detach()
    shape, dtype = list(tensor.shape), dtype_name(tensor.dtype)
    if tensor.device.type == "cuda" and cuda_ipc:
        return NamedTensor(name, shape, dtype, cuda_ipc=[_share_cuda(tensor) for _ in range(num_ranks)])
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensor {name!r} is on {tensor.device}; give CPU or CUDA tensors")
    data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return NamedTensor(name, shape, dtype, data=data)


def from_wire(msg: NamedTensor, rank: int) -> torch.Tensor:
    """The tensor a message carries, as rank `rank` sees it: a CPU copy of the bytes, or the caller's
    GPU memory itself (on the caller's device)."""
    dtype = dtype_from_name(msg.dtype)
    if msg.cuda_ipc:
        return _open_cuda(msg.cuda_ipc[rank], msg.shape, dtype)
    assert msg.data is not None, msg.name
    flat = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if msg.data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(msg.shape)


def _share_cuda(tensor: torch.Tensor) -> CudaIpcTensor:
    """reduce_tensor's view of a CUDA tensor, field by field. Every call registers a new reference
    with the caller's allocator, released when the rank that opens it drops its tensor."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, fields = reduce_tensor(tensor)
    assert rebuild is rebuild_cuda_tensor, rebuild
    (_, _, stride, offset, _, _, device, handle, size_bytes, offset_bytes, _, counter, counter_offset, event, sync) = (
        fields
    )
    return CudaIpcTensor(
        device=int(device),
        handle=handle,
        storage_size_bytes=size_bytes,
        storage_offset_bytes=offset_bytes,
        ref_counter_handle=counter,
        ref_counter_offset=counter_offset,
        event_handle=event,
        event_sync_required=sync,
        stride=list(stride),
        offset=offset,
    )


def _open_cuda(ipc: CudaIpcTensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor,
        torch.Size(shape),
        tuple(ipc.stride),
        ipc.offset,
        torch.storage.TypedStorage,
        dtype,
        ipc.device,
        ipc.handle,
        ipc.storage_size_bytes,
        ipc.storage_offset_bytes,
        False,
        ipc.ref_counter_handle,
        ipc.ref_counter_offset,
        ipc.event_handle,
        ipc.event_sync_required,
    )
