"""The global sample order: world-size independent, disjoint, complete, resumable in O(1)."""

import numpy as np
import pytest

from distsft.data.sampler import GlobalOrder, StepBatchSampler, eval_shards, split_step


def rows_seen(order, micro, accum, world, start, total):
    seen = []
    for rank in range(world):
        s = StepBatchSampler(order, micro, accum, world, rank, total, start_step=lambda: start)
        seen.append([i for batch in s for i in batch])
    return seen


@pytest.mark.parametrize("micro,accum,world", [(4, 4, 1), (4, 2, 2), (2, 2, 4), (1, 16, 1), (8, 1, 2)])
def test_each_step_consumes_the_same_global_batch_whatever_the_world(micro, accum, world):
    order = GlobalOrder(num_rows=100, global_batch=16, seed=3)
    for step in range(12):  # crosses epoch boundaries (6 steps per epoch)
        parts = [split_step(order.step_rows(step), micro, accum, world, r) for r in range(world)]
        flat = [i for p in parts for mb in p for i in mb]
        assert sorted(flat) == sorted(order.step_rows(step).tolist())  # disjoint and complete
        assert all(len(mb) == micro for p in parts for mb in p)
        assert all(len(p) == accum for p in parts)


def test_epoch_is_a_permutation_and_epochs_differ():
    order = GlobalOrder(num_rows=64, global_batch=8, seed=0)
    e0 = np.concatenate([order.step_rows(s) for s in range(8)])
    e1 = np.concatenate([order.step_rows(s) for s in range(8, 16)])
    assert sorted(e0.tolist()) == list(range(64)) and sorted(e1.tolist()) == list(range(64))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(GlobalOrder(64, 8, 0).step_rows(9), order.step_rows(9))  # deterministic
    assert not np.array_equal(GlobalOrder(64, 8, 1).step_rows(0), order.step_rows(0))


def test_partial_last_batch_is_dropped_so_every_rank_takes_the_same_steps():
    order = GlobalOrder(num_rows=37, global_batch=8, seed=0)
    assert order.steps_per_epoch == 4
    counts = [len(r) for r in rows_seen(order, 2, 2, 2, 0, 4)]
    assert counts == [16, 16]


def test_resume_continues_exactly_on_another_world_size():
    order = GlobalOrder(num_rows=200, global_batch=12, seed=5)
    straight = {s: sorted(order.step_rows(s).tolist()) for s in range(20)}
    # 2 processes for 7 steps, then 3 processes (accum re-derived: 12 = 2 × 2 × 3) from step 7
    first = rows_seen(order, micro=3, accum=2, world=2, start=0, total=7)
    second = rows_seen(order, micro=2, accum=2, world=3, start=7, total=20)
    got = sorted(i for r in first + second for i in r)
    assert got == sorted(i for s in range(20) for i in straight[s])
    assert len(StepBatchSampler(order, 3, 2, 2, 0, 20, start_step=lambda: 0)) == 40


def test_start_step_is_read_when_iteration_begins():
    order = GlobalOrder(num_rows=40, global_batch=4, seed=0)
    state = {"step": 0}
    s = StepBatchSampler(order, 4, 1, 1, 0, 10, start_step=lambda: state["step"])
    state["step"] = 8  # as after HF restores trainer_state.json
    assert [b for b in s] == [order.step_rows(8).tolist(), order.step_rows(9).tolist()]


def test_too_few_rows_for_a_global_batch_is_refused():
    with pytest.raises(ValueError):
        GlobalOrder(num_rows=3, global_batch=4, seed=0)


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 4, 3), (1, 2, 2), (16, 4, 4)])
def test_eval_shards_cover_every_row_once_with_equal_batch_counts(n, batch, world):
    shards = [eval_shards(n, batch, world, r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(i for s in shards for b in s for i in b) == list(range(n))
