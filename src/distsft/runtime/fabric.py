"""The network the process group runs over, checked before it forms.

Cross-node gloo: gloo binds to the address its host name resolves to. Debian/Ubuntu's /etc/hosts maps
the host name to 127.0.1.1, which gloo happily binds; it then tells the other nodes to connect to
127.0.1.1, their own loopback, and the rendezvous times out after the collective timeout with a message
that names neither cause nor cure. `loopback_problem` detects it (our name resolves to a loopback
address while another node of the job does not) and `check_gloo_interface` either sets
GLOO_SOCKET_IFNAME when exactly one interface can be meant, or stops with the variable to set and the
candidates. A local test cluster whose "nodes" all resolve to loopback is one machine: nothing to fix.

NCCL: `init_process_group(device_id=...)` creates the communicator at init instead of lazily at the
first collective, so a broken fabric fails there; `init_failure` turns what it raises into one message.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Callable, Iterable

from distsft.errors import SpecError

GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


def _resolve(name: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError:
        return []


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def loopback_problem(hostname: str, other_nodes: Iterable[str],
                     resolve: Callable[[str], list[str]] | None = None) -> str | None:
    """Why gloo would advertise an unreachable address, or None. Only a problem when some other node of
    the job resolves to a real address: then the nodes are different machines."""
    resolve = resolve or _resolve
    own = resolve(hostname)
    if not own or not all(_is_loopback(a) for a in own):
        return None
    remote = [n for n in other_nodes if n != hostname and any(not _is_loopback(a) for a in resolve(n))]
    if not remote:
        return None
    return (f"this node's host name {hostname!r} resolves to {', '.join(own)} (a loopback address, "
            "typically the 127.0.1.1 line of /etc/hosts), so gloo would tell the other nodes "
            f"(e.g. {remote[0]}) to connect to their own loopback")


def interfaces() -> dict[str, str]:
    """Up, non-loopback network interfaces with an IPv4 address: name -> address."""
    import psutil
    stats = psutil.net_if_stats()
    out: dict[str, str] = {}
    for name, addrs in psutil.net_if_addrs().items():
        if name in stats and not stats[name].isup:
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not _is_loopback(a.address):
                out[name] = a.address
                break
    return out


def check_gloo_interface(hostname: str, other_nodes: Iterable[str],
                         candidates: dict[str, str] | None = None) -> dict[str, str]:
    """Before a multi-node process group: nothing when GLOO_SOCKET_IFNAME is set or there is no
    problem; {GLOO_SOCKET_IFNAME: name} when exactly one interface can be meant (the caller sets it and
    says so); otherwise a SpecError naming the variable and the candidates."""
    if os.environ.get(GLOO_IFNAME):
        return {}
    why = loopback_problem(hostname, other_nodes)
    if why is None:
        return {}
    cands = interfaces() if candidates is None else candidates
    if len(cands) == 1:
        return {GLOO_IFNAME: next(iter(cands))}
    listed = ", ".join(f"{n} ({a})" for n, a in sorted(cands.items())) or "none found"
    raise SpecError(f"{why}. Set {GLOO_IFNAME} to the interface the nodes reach each other on (candidates "
                    f"here: {listed}), e.g. in slurm.setup: `export {GLOO_IFNAME}=<name>` (and NCCL_SOCKET_IFNAME "
                    "alike), or fix /etc/hosts")


def init_failure(exc: BaseException, master: str, port: int, backend: str) -> str:
    """One message for a process group that could not form (rendezvous or communicator init)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    hints = [f"{GLOO_IFNAME} / NCCL_SOCKET_IFNAME (the interface the nodes reach each other on)",
             "NCCL_DEBUG=INFO for NCCL's own account"] if "nccl" in backend else \
        [f"{GLOO_IFNAME} (the interface the nodes reach each other on)"]
    return (f"the process group ({backend}) could not form with the main process at {master}:{port}: "
            f"{first}. Check that every node reaches {master}:{port}; set " + "; ".join(hints))
