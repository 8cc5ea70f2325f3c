"""Kernels and live MFU on a GPU: a real `distsft run` on CUDA with torch.compile (and Liger when
installed) logs `mfu`. Skipped without CUDA (the CPU error path is in test_options.py)."""

from __future__ import annotations

import importlib.util

import pytest

import helpers as h

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _cuda() -> bool:
    from distsft.runtime.hardware import cuda_info
    return cuda_info()[0]


@pytest.mark.parametrize("liger", [False, True])
def test_compile_and_liger_run_on_cuda_and_log_mfu(tmp_path, liger):
    if not _cuda():
        pytest.skip("needs CUDA")
    if liger and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("needs the liger-kernel package")
    out = tmp_path / "run"
    args = ["--gpus", "1", "train.max_steps=6", "train.torch_compile=true", "logging.peak_tflops=100",
            "train.bf16=true"] + (["model.use_liger_kernel=true"] if liger else [])
    h.run("run", h.write_spec(tmp_path / "spec.yaml", out), *args, check=True, timeout=900)
    steps = [m for m in h.metrics(out) if "loss" in m]
    assert len(steps) == 6
    assert all(0 < m["mfu"] < 1 for m in steps[1:]), [m.get("mfu") for m in steps]
