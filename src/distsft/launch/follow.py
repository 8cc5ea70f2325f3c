"""`distsft submit --wait`: follow a SLURM job through requeues until it ends, printing rank 0's log,
and turn its outcome into an exit code (0 completed, 2 bad input on a rank, 75 preempted and not
requeued, 1 anything else) with the informative end of each rank's error log."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path
from distsft.checkpoint import preempt
from distsft.checkpoint.preempt import EXIT_PREEMPTED

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
_QUIET = ("submitit INFO", "submitit ERROR", "submitit WARNING")  # submitit's own log lines, left out of the followed log
_RANK_FAILED = re.compile(r"RankFailed: rank (\d+) exited with code (\d+)")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_state(job_id: str) -> dict[str, str]:
    """JobState (and Reason, Restarts, NodeList, ExitCode) from slurmctld while it remembers the job,
    then from accounting. Asked afresh every time (submitit caches finished states per process, and its
    sacct-based state can read UNKNOWN right after a job ends)."""
    p = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if p is not None and p.returncode == 0 and "JobState=" in p.stdout:
        fields = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)
        return {k: fields.get(k, "") for k in ("JobState", "Reason", "Restarts", "NodeList", "ExitCode")}
    p = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList,ExitCode"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        state, nodes, code = (p.stdout.strip().splitlines()[-1].split("|") + ["", "", ""])[:3]
        return {"JobState": state.split()[0] if state else "UNKNOWN", "NodeList": nodes, "ExitCode": code,
                "Reason": "", "Restarts": ""}
    return {"JobState": "UNKNOWN"}


class _Tail:
    def __init__(self, path: Path):
        self.path, self.pos = path, 0

    def read(self) -> str:
        try:
            size = self.path.stat().st_size
        except OSError:
            return ""
        if size < self.pos:
            self.pos = 0  # truncated (a log opened without append mode)
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        # Hold back an unfinished last line until it is complete.
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        return data[:cut].decode(errors="replace")

    def rest(self) -> str:
        with contextlib.suppress(OSError):
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
            self.pos += len(data)
            return data.decode(errors="replace")
        return ""


def follow(job_id: str, folder: Path, output_dir: Path, poll_s: float = 2.0, max_requeues: int | None = None) -> int:
    """Print rank 0's log as it grows, through requeues, until the job ends; exit with its outcome:
    0 COMPLETED, 2 a rank found bad input, 75 preempted and not requeued, 1 anything else."""
    log = _Tail(folder / f"{job_id}_0_log.out")
    last: tuple[str, str] = ("", "")
    restarts = "0"
    known = time.monotonic()
    try:
        while True:
            chunk = "".join(ln for ln in log.read().splitlines(keepends=True) if not ln.startswith(_QUIET))
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            info = job_state(job_id)
            state = info["JobState"].rstrip("+")
            if info.get("Restarts") and info["Restarts"] != restarts:
                restarts = info["Restarts"]
                limit = f" of at most {max_requeues}" if max_requeues is not None else ""
                print(f"distsft: job {job_id} was requeued (restart {restarts}{limit}); following it until it "
                      "ends", flush=True)
            if state in FINAL_STATES:
                break
            if state != "UNKNOWN":
                known = time.monotonic()
            elif time.monotonic() - known > 600:
                print(f"distsft: neither slurmctld nor accounting has known job {job_id} for 10 minutes; "
                      f"stopped following (logs: {folder})", file=sys.stderr)
                return 1
            key = (state, info.get("Reason", "") if state == "PENDING" else info.get("NodeList", ""))
            if key != last and state != "UNKNOWN":
                last = key
                detail = f" ({key[1]})" if state == "PENDING" and key[1] not in ("", "None") else (
                    f" on {key[1]}" if state == "RUNNING" and key[1] else "")
                print(f"distsft: job {job_id} {state}{detail}", flush=True)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ndistsft: stopped following; job {job_id} keeps running (`scancel {job_id}` stops it)",
              file=sys.stderr)
        return 130
    time.sleep(min(poll_s, 1.0))  # lines written just before the job ended
    sys.stdout.write("".join(ln for ln in log.rest().splitlines(keepends=True) if not ln.startswith(_QUIET)))
    sys.stdout.flush()
    if state == "COMPLETED":
        print(f"distsft: job {job_id} completed; outputs in {output_dir}", flush=True)
        return 0
    codes = _rank_codes(folder, job_id)
    preempted = preempt.was_preempted(output_dir)
    print(f"distsft: job {job_id} ended {info['JobState']}", file=sys.stderr)
    logs = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda q: int(q.name.split("_")[1]))
    for p in logs[:4]:
        tail = _error_tail(p.read_text(errors="replace"))
        if tail:
            print(f"--- {p.name} (rank {p.name.split('_')[1]}), last lines:\n" + "\n".join(tail), file=sys.stderr)
    if len(logs) > 4:
        print(f"--- the other ranks' logs: {folder}/{job_id}_<rank>_log.err", file=sys.stderr)
    if 2 in codes.values():
        return 2
    if preempted:  # a complete checkpoint, written when the ranks were asked to stop
        print(f"distsft: the job was preempted and not requeued; its checkpoint is in {output_dir}: resubmit "
              f"the same command to resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    return 1


def _rank_codes(folder: Path, job_id: str) -> dict[int, int]:
    """Exit codes of recipe.run_rank per rank, from submitit's error pickles (RankFailed's message)."""
    codes: dict[int, int] = {}
    for p in folder.glob(f"{job_id}_*_result.pkl"):
        try:
            import pickle
            with open(p, "rb") as f:
                kind, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 - a missing or partial pickle says nothing
            continue
        m = _RANK_FAILED.search(str(payload)) if kind == "error" else None
        if m:
            codes[int(m.group(1))] = int(m.group(2))
    return codes


_TORCH_PREFIX = re.compile(r"^\[rank\d+\]: ")
_PROGRESS = re.compile(r"\d+%\|")  # tqdm bars (loading weights)


def _error_tail(text: str, n: int = 12) -> list[str]:
    """The informative end of a rank's stderr: without submitit's log lines and Python warnings, each
    traceback cut to its exception line (the full log is on disk)."""
    lines = [_TORCH_PREFIX.sub("", ln) for ln in text.splitlines()]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("submitit ") or not line.strip() or _PROGRESS.search(line) or re.search(r": \w*Warning: ", line):
            i += 2 if re.search(r": \w*Warning: ", line) and i + 1 < len(lines) and lines[i + 1].startswith(" ") else 1
            continue
        if line.startswith("Traceback (most recent call last):"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            if j < len(lines):
                out.append(lines[j])
            i = j + 1
            continue
        out.append(line)
        i += 1
    return out[-n:]
