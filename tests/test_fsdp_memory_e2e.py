"""FSDP2 memory and precision properties on CPU, two real ranks over gloo (tests/fsdp_worker.py): under
gradient accumulation each micro-batch's gradients are reduce-scattered (no unsharded gradient held
until the step), gradients are reduced in fp32, rank 0 alone reads the checkpoint and every rank's
shards still equal it after prepare, and the final model is written in bf16 (the training dtype),
equal to the trained weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers as h

pytestmark = pytest.mark.slow


def test_fsdp2_accumulation_rank0_loading_and_final_save(tmp_path):
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "unused", "distributed:\n  backend: fsdp\n  gpus_per_node: 2\n")
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29731", str(h.ROOT / "tests" / "fsdp_worker.py"), str(spec), str(out)],
                       capture_output=True, text=True, env=h.env(), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # item 2: sharded gradients exist after the first micro-batch on every rank (no_sync would leave them
    # empty while holding the whole unsharded gradient)
    assert r0["sharded_grads_after_first_micro_batch"] and r1["sharded_grads_after_first_micro_batch"]
    # item 15: fp32 reduction under bf16 compute
    assert r0["reduce_dtype"] == r1["reduce_dtype"] == "torch.float32"
    # item 3: rank 1 never opened the checkpoint (the worker makes it raise there), yet after prepare the
    # gathered parameters equal the checkpoint's, and the rotary buffers are the same on both ranks
    assert r0["loaded_equal"] and r0["compared"] > 10
    assert r0["buffers"] == r1["buffers"] and r0["buffers"]
    # item 9: written in bf16, equal to the trained (fp32 master) weights cast to bf16
    assert r0["saved_dtypes"] == ["torch.bfloat16"] and r0["saved_equal"] and r0["config_dtype"] == "bfloat16"
