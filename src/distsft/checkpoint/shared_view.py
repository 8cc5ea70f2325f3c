"""Start-up check that every rank sees the same OUTPUT_DIR.

Checkpoints, the resume decision and the data position all assume one output_dir that every node
reads and writes. When a node sees another directory at that path (node-local scratch, a mount missing
on one node), its ranks would start fresh while node 0 resumes: a hang in the first collective, or
silent divergence. Rank 0 writes a nonce file; every rank looks for it for a few seconds (a network
file system may show a new file late); then all ranks learn who did not see it and exit 2 together,
rank 0 naming the nodes and the path.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from distsft.runtime import dist
from distsft import rundir

CHECK_FILE = rundir.SHARED_VIEW_CHECK
WAIT_S = 10.0


def _sees(out: Path, nonce: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.listdir(out)  # revalidates a network file system's cached view of the directory
            if (out / CHECK_FILE).read_text().strip() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check(output_dir: str | Path, wait_s: float = WAIT_S) -> None:
    """Collective: every rank calls it once the process group exists. Raises dist.AgreedError (exit 2)
    on every rank when some rank does not see rank 0's OUTPUT_DIR."""
    e = dist.env()
    if e.world_size <= 1 or not dist.initialized():
        return
    out = Path(output_dir).resolve()
    nonce = ""
    if e.is_main:
        nonce = uuid.uuid4().hex
        tmp = out / f"{CHECK_FILE}.{nonce}.tmp"
        tmp.write_text(nonce)
        os.replace(tmp, out / CHECK_FILE)
    nonce = dist.broadcast_object(nonce)
    seen = True if e.is_main else _sees(out, nonce, wait_s)
    views = dist.gather_object((e.rank, e.node_name, seen))
    if e.is_main:
        (out / CHECK_FILE).unlink(missing_ok=True)
    blind = [(rank, node) for rank, node, ok in views if not ok]
    if not blind:
        return
    nodes = sorted({node for _, node in blind})
    ranks = ", ".join(str(rank) for rank, _ in blind)
    raise dist.AgreedError(
        f"output_dir {out} is not shared: node(s) {', '.join(nodes)} (rank(s) {ranks}) do not see the file "
        f"rank 0 wrote there on node {e.node_name} within {wait_s:.0f} s. Every node must see the same "
        "output_dir (checkpoints and the resume decision live there): put it on a file system that all "
        "nodes mount at that path")
