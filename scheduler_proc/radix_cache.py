"""The prefix cache: a radix tree over token ids whose nodes own KV slots of the pool.

Requests that share a prefix share its KV: a new request matches its longest cached prefix and
computes only the rest. Running requests lock their path so it cannot be evicted; unlocked leaves
are evicted least-recently-used first when the pool needs room. `NoCache` has the same methods and
caches nothing, so the scheduler reads the same with the cache on or off.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Optional

import torch

from scheduler_proc.kv_pool import KVPool


class TreeNode:
    """A run of tokens (`key`) and the KV slots holding them (`value`), below `parent`."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: Optional[TreeNode]) -> None:
        self.children: dict[int, TreeNode] = {}  # by the child's first token
        self.parent = parent
        self.key = key
        self.value = value  # int64 slots, one per token of key
        self.lock_ref = 0  # running requests whose path goes through this node
        self.last_access = 0


class RadixCache:
    """Token ids -> KV slots, shared by prefix. Slots inserted here belong to the tree until evicted."""

    enabled = True

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._clock = itertools.count(1)  # a counter, not wall time: LRU order is exact and testable
        self.reset()

    def reset(self) -> None:
        """Drop every node, freeing its slots; only valid when nothing is locked."""
        root = getattr(self, "root", None)
        if root is not None:
            assert self._protected == 0, "reset while requests lock the tree"
            for node in _walk(root):
                if node is not root:
                    self.pool.free_slots(node.value)
        self.root = TreeNode([], self._empty(), None)
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0
        self._protected = 0

    # ---- sizes ----

    def evictable_size(self) -> int:
        """Slots held by unlocked nodes: free to take back when the pool needs room."""
        return self._evictable

    def protected_size(self) -> int:
        """Slots on paths locked by running requests."""
        return self._protected

    # ---- match and insert ----

    def match_prefix(self, ids: list[int]) -> tuple[torch.Tensor, TreeNode]:
        """The slots of the longest cached prefix of ids, and the node where it ends.

        A match ending inside a node splits it, so the returned node ends exactly at the match."""
        node, pos, values = self.root, 0, []
        now = next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            common = _common_prefix_len(child.key, ids, pos)
            if common < len(child.key):
                child = self._split(child, common)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + common
        return (torch.cat(values) if values else self._empty()), node

    def insert(self, ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, TreeNode, int]:
        """Cache ids with their KV slots; returns what the tree then holds for ids (slots, last node)
        and how many leading tokens it held already.

        Where the tree already held a token the tree's slot wins: the caller frees its own
        duplicate (a returned slot that differs from the one given)."""
        assert len(ids) == slots.numel(), (len(ids), slots.numel())
        slots = slots.to(torch.int64)
        node, pos, values = self.root, 0, []
        existing = len(ids)
        now = next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                existing = pos
                child = TreeNode(list(ids[pos:]), slots[pos:].clone(), node)
                node.children[ids[pos]] = child
                self._evictable += len(child.key)
                common = len(child.key)
            else:
                common = _common_prefix_len(child.key, ids, pos)
                if common < len(child.key):
                    child = self._split(child, common)
            child.last_access = now
            values.append(child.value)
            node, pos = child, pos + common
        return (torch.cat(values) if values else self._empty()), node, existing

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Cut child after `at` tokens; the new upper part is returned. The child object stays the
        lower part, so nodes that requests hold keep meaning the same path end."""
        upper = TreeNode(child.key[:at], child.value[:at], child.parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        upper.children[child.key[at]] = child
        child.parent.children[child.key[0]] = upper
        child.parent, child.key, child.value = upper, child.key[at:], child.value[at:]
        return upper

    # ---- locks ----

    def lock(self, node: Optional[TreeNode]) -> None:
        """A running request uses the path root..node: keep it from eviction."""
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Optional[TreeNode]) -> None:
        while node is not None and node is not self.root:
            assert node.lock_ref > 0, "unlock without lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    # ---- eviction ----

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots (or all evictable ones), least recently used leaves first;
        returns the number freed."""
        if num_tokens <= 0:
            return 0
        heap = [(n.last_access, id(n), n) for n in _walk(self.root) if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.pool.free_slots(node.value)
            freed += len(node.key)
            self._evictable -= len(node.key)
            parent = node.parent
            del parent.children[node.key[0]]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.pool.device)


class NoCache:
    """The prefix cache turned off (disable_radix_cache): matches nothing, keeps nothing."""

    enabled = False

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def reset(self) -> None:
        pass

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def match_prefix(self, ids: list[int]) -> tuple[torch.Tensor, None]:
        return torch.empty(0, dtype=torch.int64, device=self.pool.device), None

    def insert(self, ids: list[int], slots: torch.Tensor) -> tuple[torch.Tensor, None, int]:
        return self.match_prefix(ids)[0], None, 0

    def lock(self, node: None) -> None:
        pass

    def unlock(self, node: None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0


PrefixCache = RadixCache | NoCache


def create_prefix_cache(disable: bool, pool: KVPool) -> PrefixCache:
    return NoCache(pool) if disable else RadixCache(pool)


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return _common_prefix_len(a, b, 0)


def _common_prefix_len(key: list[int], ids: list[int], start: int) -> int:
    """Common prefix length of key and ids[start:]; slice comparisons run in C, so long shared
    prefixes cost a few passes instead of a Python loop per token."""
    n = min(len(key), len(ids) - start)
    if n <= 0 or key[0] != ids[start]:  # most keys part at once: no slices copied for them
        return 0
    if key[:n] == ids[start : start + n]:
        return n
    lo, hi = 0, n  # key[:lo] matches, key[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if key[lo:mid] == ids[start + lo : start + mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _walk(root: TreeNode):
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())
