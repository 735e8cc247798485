"""The vocabulary mask of a step's constrained rows: filled on the host from the requests' matchers
(xgrammar, several rows at once in its own threads), copied to the device, and applied there to the logits
the sampler reads (xgrammar's kernel: -inf wherever the grammar forbids the token).

A step with a constrained row samples only once each of its requests has its previous token in its
matcher; scheduler.py decides when that is (with overlap, after the step before is read).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from scheduler_proc.request import Request


class TokenMasks:
    """One [rows, ceil(vocab / 32)] int32 bitmask, reused every step; allocated on first use."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self._host: Optional[torch.Tensor] = None  # pinned on CUDA, so the copy to the device is asynchronous
        self._on_device: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None  # the host buffer may be written again after this
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher

    def fill(self, reqs: list[Request]) -> torch.Tensor:
        """The mask of a step's sampled rows (reqs in sampling-row order), on the device: row s allows what
        reqs[s]'s grammar allows next, or every token for a free request, or for one that has ended (its
        token is dropped). A matcher that fails sets that request's error and leaves its row open."""
        host, on_device = self._buffers()
        rows = host[: len(reqs)]
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has left the buffer (long since, in practice)
        rows.fill_(-1)  # every bit set: every token allowed
        live = [s for s, req in enumerate(reqs) if req.grammar is not None and req.finish is None and req.error is None]
        try:
            if live:
                self._batch.batch_fill_next_token_bitmask([reqs[s].grammar for s in live], host, live)
        except Exception:  # find the matcher that failed: it alone ends
            for s in live:
                try:
                    reqs[s].grammar.fill_next_token_bitmask(host, s)
                except Exception as exc:
                    reqs[s].error = f"filling the token mask failed: {type(exc).__name__}: {exc}"
                    rows[s].fill_(-1)
        if on_device is host:
            return rows
        on_device = on_device[: len(reqs)]
        on_device.copy_(rows, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host is None:
            import xgrammar

            width = xgrammar.get_bitmask_shape(self.max_rows, self.vocab_size)[1]
            cuda = self.device.type == "cuda"
            self._host = torch.empty((self.max_rows, width), dtype=torch.int32, pin_memory=cuda)
            self._on_device = torch.empty_like(self._host, device=self.device) if cuda else self._host
            self._batch = xgrammar.BatchGrammarMatcher(max_threads=_fill_threads())
        assert self._on_device is not None
        return self._host, self._on_device


def _fill_threads() -> int:
    """Threads filling masks: half the cores this process may use (xgrammar's "auto" counts the host's, and
    its threads then contend with torch's where a container has few), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def apply_token_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set logits [S, V] to -inf where mask [S, ceil(V / 32)] has a 0 bit (in place)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, mask, vocab_size=logits.shape[1])
