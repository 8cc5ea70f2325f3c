"""One rank of tests/test_finish_order.py (started by torchrun): train.finish.finish on two real gloo
ranks with a 3-second collective timeout, where rank 0's adapter merge takes longer than that.

    torchrun --nproc_per_node 2 tests/finish_worker.py SPEC OUT

Stand-ins, and why: the trainer (its save_model writes a marker file; the real final save is covered by
the training e2e tests) and the merge (it sleeps past the timeout instead of loading a model). What is
real: the process group, its timeout, and finish's order of collectives and rank-0 work. Each rank
writes OUT/rank<R>.txt with its exit code, or the error it raised.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

MERGE_S = 8.0
TIMEOUT_S = 3.0


def main() -> None:
    spec_path, out = sys.argv[1], Path(sys.argv[2])
    import torch.distributed as tdist
    from distsft.config.spec import load_spec
    from distsft.runtime import dist
    from distsft.train import finish, model as model_lib
    tdist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    e = dist.env()
    model_lib.save_merged = lambda *a, **k: time.sleep(MERGE_S)  # a 70B merge, in miniature
    trainer = SimpleNamespace(state=SimpleNamespace(global_step=1), evaluate=lambda: None,
                              save_model=lambda d: Path(d, f"saved{e.rank}").write_text("x"))
    r = SimpleNamespace(spec=load_spec(spec_path), trainer=trainer, out=out, precision="no", started=time.time(),
                        diagnostics=SimpleNamespace(failed=False), stop_ids=None,
                        tokenizer=SimpleNamespace(save_pretrained=lambda d: None),
                        batch=SimpleNamespace(world_size=2, per_device_train_batch_size=2),
                        ctx=SimpleNamespace(preempted=False, history=[]))
    try:
        result = str(finish.finish(r))
    except Exception as exc:  # noqa: BLE001 - what the test reads
        result = f"{type(exc).__name__}: {exc}"
    (out / f"rank{e.rank}.txt").write_text(result)


if __name__ == "__main__":
    main()
