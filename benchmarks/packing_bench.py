"""Packing fill and rows vs the lower bound: distsft BFD, TRL's BFD, next-fit.

100,000 lengths from three lognormal distributions (numpy seed 0), clipped to [8, max], capacity = max.
TRL's BFD is `trl.data_utils.pack_dataset(ds, capacity, strategy="bfd")` on a Dataset of that many
rows of dummy token lists; it packs each 1,000-row `map` batch on its own (its default batch size).

    python benchmarks/packing_bench.py [--n 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distsft.data.packing import lower_bound, pack_bfd, pack_next_fit

DISTRIBUTIONS = [("chat", 5.5, 0.8, 2048), ("short", 4.8, 0.6, 2048), ("long", 6.8, 0.7, 4096)]


def trl_bfd(lengths: np.ndarray, capacity: int) -> tuple[int, float]:
    """Rows from TRL's packer, and the time it took (the Dataset is built before the clock starts)."""
    import pyarrow as pa
    from datasets import Dataset, disable_progress_bars
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset
    disable_progress_bars()
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(offsets[-1], dtype=np.int32)))
    ds = Dataset(InMemoryTable(pa.table({"input_ids": ids})))
    t0 = time.perf_counter()
    packed = pack_dataset(ds, capacity, strategy="bfd")
    dt = time.perf_counter() - t0
    assert sum(map(sum, packed["seq_lengths"])) == lengths.sum()  # nothing truncated: all fit
    return len(packed), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"\n`python benchmarks/packing_bench.py --n {args.n}`\n")
    print("| distribution | packer | rows | lower bound | rows over bound | fill | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, mu, sigma, cap in DISTRIBUTIONS:
        lengths = np.clip(rng.lognormal(mu, sigma, args.n).astype(np.int64), 8, cap)
        lb = lower_bound(lengths, cap)
        results = []
        for packer, fn in (("distsft BFD", pack_bfd), ("next-fit", pack_next_fit)):
            t0 = time.perf_counter()
            rows = len(fn(lengths, cap))
            results.append((packer, rows, time.perf_counter() - t0))
        results.insert(1, ("TRL BFD (per 1k batch)", *trl_bfd(lengths, cap)))
        label = f"{name} (mu {mu}, sigma {sigma}, max {cap}, mean {lengths.mean():.0f})"
        for packer, rows, dt in results:
            fill = lengths.sum() / (rows * cap)
            print(f"| {label} | {packer} | {rows:,} | {lb:,} | {100 * (rows - lb) / lb:.3f}% | "
                  f"{100 * fill:.2f}% | {dt:.2f} |")


if __name__ == "__main__":
    main()
