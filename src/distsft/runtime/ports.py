"""The rendezvous port, one rule for every launcher (`wanted`). Under SLURM it is derived from the job id (the same on every node and across requeues), kept
below Linux's ephemeral range (32768+, where the kernel hands out ports to outgoing connections), and
checked on the main host before the ranks rendezvous: when it is already bound there, the next free
one is used, and announced to every rank through the job's submitit folder (which every node sees).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

BASE, SPAN = 20000, 12000  # ports 20000..31999
EPHEMERAL_START = 32768
DEFAULT_PORT = 29500  # torch's and accelerate's


def wanted(requested: int | None = None, job_id: str | None = None) -> int:
    """The port the ranks should rendezvous on before checking it is free: under SLURM the job id's (the
    same on every node and across requeues, so no node has to tell the others); elsewhere
    distributed.main_process_port, else torch's default."""
    if job_id is not None:
        return from_job_id(job_id)
    return requested or DEFAULT_PORT


def from_job_id(job_id: str) -> int:
    digits = "".join(c for c in str(job_id).split("_")[0] if c.isdigit()) or "0"
    return BASE + int(digits) % SPAN


def is_free(port: int) -> bool:
    """Whether a server could listen on `port` on this host now (as torch's TCPStore would: all
    interfaces, SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (97, 99):  # no IPv6 here
                continue
            return False
    return True


def next_free(port: int, tries: int = 500) -> int:
    """`port` if it is free, else the next free one (wrapping within BASE..BASE+SPAN)."""
    for i in range(tries):
        candidate = BASE + (port - BASE + i) % SPAN if BASE <= port < BASE + SPAN else port + i
        if is_free(candidate):
            return candidate
    raise OSError(f"no free port in {port}..{port + tries - 1} on {socket.gethostname()}")


def agree_port(folder: str | Path, job_id: str, restart: int, port: int, is_main: bool,
               timeout_s: float = 300.0) -> tuple[int, bool]:
    """On the main host's rank 0: the first free port from `port`, written to the job folder. On every
    other rank: the port rank 0 wrote. Returns (port, whether it differs from `port`)."""
    path = Path(folder) / f".{job_id}_{restart}_rendezvous_port"
    if is_main:
        chosen = next_free(port)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(str(chosen))
        os.replace(tmp, path)
        return chosen, chosen != port
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chosen = int(path.read_text().strip())
            return chosen, chosen != port
        except (OSError, ValueError):
            time.sleep(0.2)
    raise TimeoutError(f"rank 0 did not announce the rendezvous port in {path} within {timeout_s:.0f} s")
