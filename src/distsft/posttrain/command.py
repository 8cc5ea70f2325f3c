"""The two commands' bodies, so cli.py stays a list of typer signatures.

`distsft export` = export.py (write) -> verify.py (reload and compare) -> hub.py (push, only once
verified). `--check` skips the writing and verifies an existing export. Exit codes: 0 ok, 1 the export
does not match the run (the numbers are printed), 2 bad input (SpecError, raised to the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from distsft.errors import SpecError
from distsft.posttrain import source

EXIT_MISMATCH = 1


def export_command(run_dir: str, out: str | None, checkpoint: str | None = None, merge: bool = False,
                   dtype: str | None = None, push_to_hub: str | None = None, private: bool = False,
                   overwrite: bool = False, check: bool = False, token: str | None = None,
                   max_shard_size: str | None = None, overrides: list[str] | None = None,
                   say: Callable[[str], None] = print) -> int:
    from distsft.posttrain import export as ex
    from distsft.posttrain import hub
    from distsft.posttrain.verify import verify
    run = Path(run_dir)
    if not out:
        raise SpecError("--out: the export directory is required")
    if push_to_hub:  # before any work: a push that cannot happen is bad input now, not after an hour
        hub.check_token(token)
        hub.check_repo(push_to_hub)
    spec = source.load_run_spec(run, overrides)
    if check:
        info = ex.read_info(Path(out))
        if checkpoint and str(checkpoint) != info["checkpoint"]:
            raise SpecError(f"--check: {out} was exported from checkpoint {info['checkpoint']}, not {checkpoint}")
        info["run_dir"] = str(run.resolve())  # the run as given now (it may have moved)
    else:
        req = ex.ExportRequest(run, Path(out), checkpoint=checkpoint or source.FINAL, merge=merge, dtype=dtype,
                               overwrite=overwrite, max_shard_size=max_shard_size or ex.DEFAULT_SHARD,
                               overrides=list(overrides or []))
        info = ex.export(req, say=say)
    report = verify(Path(out), info, spec)
    for line in report.lines:
        say(f"verify: {line}")
    if not report.ok:
        say(f"verify: FAILED: {out} does not match {info['checkpoint']} of {run}")
        return EXIT_MISMATCH
    say(f"verify: ok ({info['kind']}, {info['dtype']}, eos_token_id {report.numbers.get('eos_token_id')})")
    if push_to_hub:
        hub.push(Path(out), push_to_hub, token or "", private=private, say=say)
    return 0


def eval_command(run_dir: str, checkpoint: str | None = None, tasks: str | None = None,
                 overrides: list[str] | None = None, say: Callable[[str], None] = print) -> int:
    from distsft.posttrain.eval import run_eval
    run_eval(run_dir, checkpoint or source.FINAL, tasks=tasks, overrides=overrides, say=say)
    return 0
