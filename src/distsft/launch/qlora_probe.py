"""`distsft run`'s QLoRA check, run in a child process.

The launcher checks that bitsandbytes can quantize on this machine before any rank starts (a failure
is one message and exit 2, not one traceback per rank). Done in the launcher's own process, the probe
created a CUDA context on GPU 0 (~0.5 GB, plus bitsandbytes' kernels) that the launcher kept for the
whole run, next to rank 0's. In a child process the context dies with the child.

    python -m distsft.launch.qlora_probe DEVICE    # exit 0, or exit 2 with the message on stderr
"""

from __future__ import annotations

import subprocess
import sys

from distsft.errors import SpecError

PROBE_TIMEOUT_S = 300


def probe(device: str) -> None:
    """Raise SpecError (the child's message) when bitsandbytes cannot run 4-bit quantization on `device`;
    nothing is imported or initialised in this process."""
    try:
        p = subprocess.run([sys.executable, "-m", "distsft.launch.qlora_probe", device], capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SpecError(f"peft.method=qlora: the bitsandbytes check on {device} did not finish in "
                        f"{PROBE_TIMEOUT_S} s") from None
    if p.returncode == 0:
        return
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    msg = next((ln.split("error: ", 1)[1] for ln in reversed(lines) if ln.startswith("error: ")), None)
    raise SpecError(msg or f"peft.method=qlora: the bitsandbytes check on {device} failed (exit {p.returncode}): "
                    + (lines[-1] if lines else "no message"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import torch
    from distsft.runtime.console import quiet
    quiet()
    from distsft.train.model import check_qlora_runs
    try:
        check_qlora_runs(torch.device(argv[0] if argv else "cpu"))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
