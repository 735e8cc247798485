"""A request's KV slots and the prefix cache: the prefix matched at admission, the tree kept up to
date as the request computes, its tokens handed to the tree (or freed) when it finishes or is
retracted, and room made by eviction when the pool runs short.

Slot ownership: a request's row of req_to_token lists its slots; the first `req.shared_len` belong
to the prefix cache (locked through `req.cache_node`), the rest up to `req.kv_len` to the request.

Embedding requests never hand their KV to the cache: each pools every row of its prompt, so none
could start from a cached prefix, and their KV would only crowd out generation's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from scheduler_proc.kv_pool import KVPool
from scheduler_proc.radix_cache import PrefixCache
from scheduler_proc.request import Request


@dataclass
class PrefixMatch:
    slots: torch.Tensor  # KV slots of the cached prefix
    node: Any  # the prefix cache's node where it ends

    def __len__(self) -> int:
        return self.slots.numel()


class CacheManager:
    def __init__(self, pool: KVPool, cache: PrefixCache) -> None:
        self.pool = pool
        self.cache = cache

    @property
    def enabled(self) -> bool:
        return self.cache.enabled

    def available(self) -> int:
        """Slots that can be handed out now: free ones plus the cache's unlocked ones."""
        return self.pool.num_free_slots() + self.cache.evictable_size()

    def cached_tokens(self) -> int:
        """Slots the cache holds that no running request uses (evictable)."""
        return self.cache.evictable_size()

    def match(self, req: Request) -> PrefixMatch:
        slots, node = self.cache.match_prefix(req.cache_tokens(0, req.max_prefix_len()))
        return PrefixMatch(slots, node)

    def lock(self, match: PrefixMatch) -> None:
        """Keep a matched prefix from eviction (before counting what is available for its request)."""
        self.cache.lock(match.node)

    def unlock(self, match: PrefixMatch) -> None:
        self.cache.unlock(match.node)

    def admit(self, req: Request, match: PrefixMatch) -> None:
        """Give req a row holding its (locked) cached prefix; it computes from there on."""
        req.row = self.pool.alloc_row()
        n = len(match)
        if n:
            self.pool.set_tokens(req.row, torch.arange(n, device=self.pool.device), match.slots)
        req.kv_len = req.shared_len = n
        req.cache_node = match.node

    def cache_prefix(self, req: Request) -> None:
        """Put the tokens req computed so far into the tree (still locked by req), so requests
        arriving now share them: the other samples of one prompt, concurrent shared prefixes."""
        if self.cache.enabled and not req.msg.embed:
            self._share(req)

    def release(self, req: Request, keep: bool = True) -> None:
        """req leaves the pool (finished, aborted or retracted): its computed tokens go to the tree
        (keep, and the cache on) or back to the free list; its row is freed."""
        if keep and not req.msg.embed:
            self._share(req)
        self.pool.free_slots(self.pool.req_to_token[req.row, req.shared_len : req.kv_len])
        self.cache.unlock(req.cache_node)
        self.pool.free_row(req.row)
        req.row, req.cache_node, req.shared_len, req.kv_len = None, None, 0, 0

    def make_free(self, num_slots: int) -> None:
        """Evict cached prefixes until the pool has num_slots free slots."""
        short = num_slots - self.pool.num_free_slots()
        if short > 0:
            self.cache.evict(short)
        assert self.pool.num_free_slots() >= num_slots, (num_slots, self.pool.num_free_slots())

    def flush(self) -> int:
        """Empty the cache (nothing may be running); returns the slots freed."""
        freed = self.cache.evictable_size()
        self.cache.reset()
        return freed

    def _share(self, req: Request) -> None:
        """Insert req's computed tokens; its row then points at the tree's slots (a token another
        request inserted first keeps that request's slot, and req's duplicate is freed)."""
        slots = self.pool.req_to_token[req.row, : req.kv_len].to(torch.int64)
        tree_slots, node, existing = self.cache.insert(req.cache_tokens(0, req.kv_len), slots)
        n = tree_slots.numel()
        if n == 0:
            return
        # Below shared_len req's row already holds the tree's slots; from there to `existing` another
        # request cached the tokens first, so req's own slots there are duplicates. (Sizes known on
        # the host: no wait for the device, which matters while the next step is queued.)
        if existing > req.shared_len:
            self.pool.free_slots(slots[req.shared_len : existing])
            changed = torch.arange(req.shared_len, existing, device=slots.device)
            self.pool.set_tokens(req.row, changed, tree_slots[req.shared_len : existing])
        self.cache.lock(node)
        self.cache.unlock(req.cache_node)
        req.cache_node, req.shared_len = node, n
