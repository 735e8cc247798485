"""Handing a rank's device memory back to the caller (a trainer that needs the GPU between rollouts) and
taking it back: the weights, the KV cache with the attention's workspace, and the CUDA graphs with
their memory pool (SGLang's release_memory_occupation / resume_memory_occupation, and their tags).

Tensors keep their identity: each one's storage is resized to nothing and back, so every module, the
pool and the attention backend hold the same tensor objects throughout. Their addresses change, so
the CUDA graphs (which hold addresses) are dropped on any release and captured again once all is back.

The weights are copied to pinned host memory first and copied back on resume, rather than read again
from the checkpoint: a trainer has most often updated them in memory since they were loaded. The KV
cache's contents are dropped (the scheduler empties the prefix cache and retracts running requests
before releasing it). The same code runs on CPU, where it frees host memory instead (the tests).
"""

from __future__ import annotations

import gc
import logging

import torch

from scheduler_proc.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class MemoryOccupation:
    """Which of a rank's memory kinds (MEMORY_TAGS) are released, and what resuming them needs."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.released: set[str] = set()
        self.saved_weights: list[tuple[torch.UntypedStorage, torch.Tensor]] = []  # storage, its host copy
        self.kv_sizes: list[tuple[torch.UntypedStorage, int]] = []  # storage, its size in bytes

    @property
    def holds_requests(self) -> bool:
        """No step can run: the weights or the KV cache are away (the CUDA graphs alone are not needed)."""
        return bool(self.released & {"weights", "kv_cache"})

    def release(self, tags: list[str]) -> str:
        """Free the memory of `tags`, and the CUDA graphs with any of them; returns a message."""
        runner, before = self.runner, self._device_bytes()
        runner.graphs = None  # its graphs and their private memory pool go with it
        getattr(runner.attention, "graph_decoders", {}).clear()  # flashinfer's, one workspace each; made again
        _synchronize(runner.device)
        self.released.add("cuda_graph")
        with torch.inference_mode(False), torch.no_grad():
            if "weights" in tags and "weights" not in self.released:
                # Every copy first: a failure (host memory) leaves the weights where they were.
                self.saved_weights = [(s, _save(s, runner.device)) for s in _unique_storages(self._weights())]
                for storage, _ in self.saved_weights:
                    storage.resize_(0)
                self.released.add("weights")
            if "kv_cache" in tags and "kv_cache" not in self.released:
                self.kv_sizes = [(s, s.nbytes()) for s in _unique_storages(self._kv_tensors())]
                for storage, _ in self.kv_sizes:
                    storage.resize_(0)
                self.released.add("kv_cache")
        # Nothing may keep a graph's pool alive past this point: start-up's graphs are in the frozen heap
        # (freeze_startup_heap), which a collection does not look at until it is unfrozen.
        gc.unfreeze()
        gc.collect()
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        freed = before - self._device_bytes()
        logger.info("released %s: %.2f GiB of device memory handed back", sorted(self.released), freed / 2**30)
        return f"released {sorted(self.released)}: {freed / 2**30:.2f} GiB of device memory handed back"

    @property
    def graphs_wanted(self) -> bool:
        """The CUDA graphs are away while the weights and the KV cache are back: capture_graphs() next."""
        return "cuda_graph" in self.released and not self.holds_requests

    def resume(self, tags: list[str]) -> str:
        """Take back the memory of `tags` (the CUDA graphs come back with capture_graphs(), once every
        rank has its memory back: capturing runs collectives under tensor parallelism)."""
        runner = self.runner
        with torch.inference_mode(False), torch.no_grad():
            if "weights" in tags and "weights" in self.released:
                for storage, host in self.saved_weights:
                    storage.resize_(host.numel())
                    _as_bytes(storage).copy_(host, non_blocking=True)
                _synchronize(runner.device)
                self.saved_weights = []
            if "kv_cache" in tags and "kv_cache" in self.released:
                for storage, nbytes in self.kv_sizes:
                    storage.resize_(nbytes)
                    _as_bytes(storage).zero_()
                self.kv_sizes = []
        self.released -= set(tags) - {"cuda_graph"}
        return f"resumed {sorted(set(tags))}; released: {sorted(self.released)}"

    def capture_graphs(self) -> str:
        """Capture the CUDA graphs again (whether or not "cuda_graph" was among a resume's tags: they
        only make sense with the weights and the KV cache, and come back with them)."""
        self.runner.recapture_graphs()  # None on CPU, or with CUDA graphs disabled
        self.released.discard("cuda_graph")
        gc.freeze()  # the heap out of the collector's view again, as at start-up (release collected it)
        return "CUDA graphs captured" if self.runner.graphs is not None else "no CUDA graphs to capture"

    def _weights(self) -> list[torch.Tensor]:
        model = self.runner.model
        return [*model.parameters(), *model.buffers()]

    def _kv_tensors(self) -> list[torch.Tensor]:
        pool = self.runner.pool
        workspace = getattr(self.runner.attention, "workspace", None)  # flashinfer's, 256 MiB
        return [pool.k_buffer, pool.v_buffer, pool.req_to_token] + ([workspace] if workspace is not None else [])

    def _device_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.runner.device) if self.runner.device.type == "cuda" else 0


def _unique_storages(tensors: list[torch.Tensor]) -> list[torch.UntypedStorage]:
    """Each storage once (a tied embedding and LM head share one), skipping empty ones."""
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages.setdefault(storage.data_ptr(), storage)
    return list(storages.values())


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _save(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=device.type == "cuda")
    host.copy_(_as_bytes(storage))
    return host


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
