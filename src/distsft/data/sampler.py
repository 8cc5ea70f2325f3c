"""One global sample order that does not depend on the world size.

Optimizer step `s` consumes rows `order[s*G : (s+1)*G]` of the packed dataset (G = global batch), where
`order` is the concatenation of per-epoch permutations drawn from (seed, epoch). The rows of a step are
then split disjointly into `accum` micro-batches × `world` ranks × `micro` rows. Because the position
in the data is a pure function of the step, a resume needs only the step (O(1), no replay), and a
resume on another process count continues the same order with the same global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


class GlobalOrder:
    def __init__(self, num_rows: int, global_batch: int, seed: int):
        if num_rows < global_batch:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch}")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        # A partial last batch is dropped so every rank takes the same number of steps (no hang at the end).
        self.steps_per_epoch = num_rows // global_batch
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def step_rows(self, step: int) -> np.ndarray:
        """The global batch of optimizer step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[within * self.global_batch:(within + 1) * self.global_batch]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


def split_step(rows: np.ndarray, micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's `accum` micro-batches of one step: micro-batch m of rank r is block (m, r)."""
    assert len(rows) == micro * accum * world, (len(rows), micro, accum, world)
    blocks = rows.reshape(accum, world, micro)
    return [blocks[m, rank].tolist() for m in range(accum)]


class StepBatchSampler:
    """Batch sampler for one rank: yields its micro-batches from the current step to `total_steps`.

    The start step is read when iteration begins (`start_step()`), i.e. after the trainer has restored
    its state from a checkpoint, so resuming costs nothing.
    """

    def __init__(self, order: GlobalOrder, micro: int, accum: int, world: int, rank: int,
                 total_steps: int, start_step: Callable[[], int]):
        self.order, self.micro, self.accum, self.world, self.rank = order, micro, accum, world, rank
        self.total_steps, self.start_step = total_steps, start_step

    def __len__(self) -> int:
        # The trainer sees one long "epoch" of all steps; real epochs are tracked by GlobalOrder.
        return self.total_steps * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step(), self.total_steps):
            yield from split_step(self.order.step_rows(step), self.micro, self.accum, self.world, self.rank)


def eval_shards(num_rows: int, batch: int, world: int, rank: int) -> list[list[int]]:
    """Rank `rank`'s eval micro-batches: rows rank, rank+world, ...; every rank gets the same number of
    batches (empty ones at the end) so collective forwards (ZeRO-3) line up."""
    mine = list(range(rank, num_rows, world))
    per_rank = -(-num_rows // world)
    n_batches = -(-per_rank // batch)
    return [mine[i * batch:(i + 1) * batch] for i in range(n_batches)]
