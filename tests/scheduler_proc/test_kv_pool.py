"""The KV pool's free list: freed slots come back (counted at once, handed out again once the fresh ones
run short) without the whole list being copied at every free."""

from __future__ import annotations

import torch

from scheduler_proc import kv_pool
from scheduler_proc.kv_pool import KVPool


def _pool(slots: int) -> KVPool:
    return KVPool(1, slots, 1, 4, torch.float32, torch.device("cpu"), 4, 16)


def test_freed_slots_are_counted_at_once_and_handed_out_again():
    pool = _pool(33)  # 32 usable slots (slot 0 is the padding rows')
    first, second = pool.alloc_slots(20), pool.alloc_slots(12)
    assert pool.num_free_slots() == 0
    pool.free_slots(first[:5])
    pool.free_slots(second[-3:])
    assert pool.num_free_slots() == 8
    again = pool.alloc_slots(8)  # the fresh slots are gone: these can only be the freed ones
    assert sorted(again.tolist()) == sorted(first[:5].tolist() + second[-3:].tolist())
    assert pool.num_free_slots() == 0
    everything = torch.cat([first[5:], second[:-3], again])
    assert sorted(everything.tolist()) == list(range(1, 33))  # each slot held exactly once


def test_a_free_does_not_copy_the_free_list():
    pool = _pool(1 << 16)
    held = [pool.alloc_slots(2) for _ in range(kv_pool._MERGE_CHUNKS)]
    free_list = pool._free_slots
    for slots in held[:-1]:
        pool.free_slots(slots)
    assert pool._free_slots is free_list  # still the same tensor: nothing was copied
    pool.free_slots(held[-1])  # the last chunk before the merge: one copy for all of them
    assert pool._free_slots is not free_list and pool.num_free_slots() == pool.capacity
    assert sorted(pool.alloc_slots(pool.capacity).tolist()) == list(range(1, 1 << 16))
