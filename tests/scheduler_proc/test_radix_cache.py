"""The radix tree alone, over a real (tiny) KV pool: match, insert, split, locks, LRU eviction, and
that every slot is always either free in the pool or held by the tree."""

from __future__ import annotations

import torch

from scheduler_proc.kv_pool import KVPool
from scheduler_proc.radix_cache import NoCache, RadixCache, common_prefix_len


def make_pool(num_tokens: int = 64) -> KVPool:
    return KVPool(
        num_layers=1,
        num_slots=num_tokens + 1,
        num_kv_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device=torch.device("cpu"),
        max_requests=4,
        max_context=num_tokens + 1,
    )


def held(tree: RadixCache) -> int:
    return tree.evictable_size() + tree.protected_size()


def no_leak(pool: KVPool, tree: RadixCache) -> bool:
    return pool.num_free_slots() + held(tree) == pool.capacity


def insert_new(pool: KVPool, tree: RadixCache, ids: list[int]) -> torch.Tensor:
    """Insert ids as a request would: fresh slots for every token; frees the duplicates."""
    slots = pool.alloc_slots(len(ids))
    tree_slots, _, existing = tree.insert(ids, slots)
    assert torch.equal(slots[existing:], tree_slots[existing:])  # new tokens keep the caller's slots
    assert bool((slots[:existing] != tree_slots[:existing]).all())  # cached ones are the tree's
    pool.free_slots(slots[:existing])
    return tree_slots


def test_match_of_empty_tree_and_unknown_ids():
    pool = make_pool()
    tree = RadixCache(pool)
    slots, node = tree.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and node is tree.root
    insert_new(pool, tree, [1, 2, 3])
    assert tree.match_prefix([9, 9])[0].numel() == 0


def test_insert_then_match_returns_the_same_slots():
    pool = make_pool()
    tree = RadixCache(pool)
    slots = insert_new(pool, tree, [1, 2, 3, 4])
    matched, _ = tree.match_prefix([1, 2, 3, 4, 5, 6])
    assert matched.tolist() == slots.tolist()
    assert tree.match_prefix([1, 2])[0].tolist() == slots[:2].tolist()
    assert tree.evictable_size() == 4 and no_leak(pool, tree)


def test_partial_match_splits_a_node_and_branches():
    pool = make_pool()
    tree = RadixCache(pool)
    a = insert_new(pool, tree, [1, 2, 3, 4, 5])
    b = insert_new(pool, tree, [1, 2, 3, 7, 8])
    assert b[:3].tolist() == a[:3].tolist()  # the shared prefix keeps the first request's slots
    assert b[3:].tolist() != a[3:].tolist()
    assert set(tree.root.children[1].children) == {4, 7}  # split after [1, 2, 3]
    assert tree.root.children[1].key == [1, 2, 3]
    assert tree.match_prefix([1, 2, 3, 7, 8])[0].tolist() == b.tolist()
    assert tree.evictable_size() == 7 and no_leak(pool, tree)


def test_duplicate_insert_keeps_the_tree_slots_and_frees_the_copy():
    pool = make_pool()
    tree = RadixCache(pool)
    first = insert_new(pool, tree, [5, 6, 7])
    free_before = pool.num_free_slots()
    second = insert_new(pool, tree, [5, 6, 7])
    assert second.tolist() == first.tolist()
    assert pool.num_free_slots() == free_before  # the copy's 3 slots went back
    assert held(tree) == 3 and no_leak(pool, tree)


def test_match_inside_a_node_splits_it_and_keeps_lock_counts():
    pool = make_pool()
    tree = RadixCache(pool)
    insert_new(pool, tree, [1, 2, 3, 4])
    _, node = tree.match_prefix([1, 2, 3, 4])
    tree.lock(node)
    assert tree.protected_size() == 4 and tree.evictable_size() == 0
    slots, upper = tree.match_prefix([1, 2, 9])  # splits the locked node after [1, 2]
    assert slots.numel() == 2 and upper.key == [1, 2] and upper.lock_ref == 1
    tree.unlock(node)  # the held node is still the path end: unlocking releases both parts
    assert tree.protected_size() == 0 and tree.evictable_size() == 4
    assert no_leak(pool, tree)


def test_locked_path_is_not_evicted():
    pool = make_pool()
    tree = RadixCache(pool)
    insert_new(pool, tree, [1, 2, 3])
    insert_new(pool, tree, [4, 5, 6])
    _, node = tree.match_prefix([1, 2, 3])
    tree.lock(node)
    assert tree.evict(100) == 3  # only [4, 5, 6]
    assert tree.match_prefix([1, 2, 3])[0].numel() == 3
    assert tree.match_prefix([4, 5, 6])[0].numel() == 0
    tree.unlock(node)
    assert tree.evict(100) == 3
    assert held(tree) == 0 and pool.num_free_slots() == pool.capacity


def test_eviction_is_least_recently_used_first_and_leaves_first():
    pool = make_pool()
    tree = RadixCache(pool)
    insert_new(pool, tree, [1, 2, 3, 4])  # oldest
    insert_new(pool, tree, [1, 2, 5, 6])
    insert_new(pool, tree, [7, 8])
    tree.match_prefix([1, 2, 3, 4])  # touched: now the newest
    assert tree.evict(1) == 2  # the LRU leaf [5, 6] goes, whole
    assert tree.match_prefix([1, 2, 5, 6])[0].numel() == 2
    assert tree.evict(1) == 2  # then [7, 8]
    assert tree.match_prefix([7, 8])[0].numel() == 0
    assert tree.match_prefix([1, 2, 3, 4])[0].numel() == 4
    assert tree.evict(3) == 4  # the leaf [3, 4], then its parent [1, 2] once it is a leaf
    assert held(tree) == 0 and pool.num_free_slots() == pool.capacity


def test_parent_of_a_locked_leaf_is_kept():
    pool = make_pool()
    tree = RadixCache(pool)
    insert_new(pool, tree, [1, 2, 3])
    insert_new(pool, tree, [1, 2, 4])
    _, node = tree.match_prefix([1, 2, 4])
    tree.lock(node)
    assert tree.evict(100) == 1  # only the leaf [3]; [1, 2] is on the locked path
    assert tree.protected_size() == 3 and no_leak(pool, tree)
    tree.unlock(node)


def test_reset_frees_everything():
    pool = make_pool()
    tree = RadixCache(pool)
    for ids in ([1, 2, 3], [1, 2, 4, 5], [9]):
        insert_new(pool, tree, ids)
    tree.reset()
    assert held(tree) == 0 and pool.num_free_slots() == pool.capacity
    assert tree.match_prefix([1, 2, 3])[0].numel() == 0


def test_random_workload_never_leaks():
    pool = make_pool(200)
    tree = RadixCache(pool)
    rng = torch.Generator().manual_seed(0)
    locked = []
    for step in range(300):
        ids = torch.randint(0, 3, (int(torch.randint(1, 12, (1,), generator=rng)),), generator=rng).tolist()
        if pool.num_free_slots() < len(ids):
            tree.evict(len(ids) - pool.num_free_slots())
        if pool.num_free_slots() < len(ids):
            continue  # everything left is locked
        tree_slots = insert_new(pool, tree, ids)
        assert tree.match_prefix(ids)[0].tolist() == tree_slots.tolist()
        if step % 7 == 0:
            node = tree.match_prefix(ids)[1]
            tree.lock(node)
            locked.append(node)
        if step % 11 == 0 and locked:
            tree.unlock(locked.pop(0))
        assert no_leak(pool, tree)
        values = torch.cat([n.value for n in _nodes(tree)]) if held(tree) else torch.empty(0)
        assert values.unique().numel() == values.numel()  # no slot owned twice
    for node in locked:
        tree.unlock(node)
    tree.evict(10**9)
    assert pool.num_free_slots() == pool.capacity


def test_no_cache_keeps_nothing():
    pool = make_pool()
    cache = NoCache(pool)
    slots = pool.alloc_slots(3)
    kept, node, existing = cache.insert([1, 2, 3], slots)
    assert kept.numel() == 0 and node is None and existing == 0
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert cache.evictable_size() == 0 and cache.evict(10) == 0


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([], [1]) == 0
    long = list(range(1000))
    assert common_prefix_len(long, long[:700] + [-1] + long[701:]) == 700


def _nodes(tree: RadixCache):
    stack = list(tree.root.children.values())
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children.values())
