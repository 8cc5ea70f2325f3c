"""Sequence parallelism on GPUs: FSDP2's ring attention (accelerate `cp_size`, torch context parallel)
and Ulysses with flash_attention_2. Needs 2 CUDA GPUs; skipped without them. Never run on this
project's CPU machines: the script-ready check for the day a GPU machine is there."""

from __future__ import annotations

import pytest

import helpers as h

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _losses(tmp_path, name, extra, *args):
    out = tmp_path / name
    h.run("run", h.write_spec(tmp_path / f"{name}.yaml", out, extra), "--gpus", "2", "train.max_steps=4",
          "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.bf16=false", *args, check=True)
    return h.train_losses(out)


@pytest.mark.parametrize("extra,args", [
    ("distributed:\n  backend: fsdp\n", ["data.packing=false", "model.attn_implementation=sdpa"]),
    ("distributed:\n  backend: deepspeed\n  zero_stage: 3\n", ["model.attn_implementation=flash_attention_2"]),
])
def test_sequence_parallel_gpu_runs_log_the_data_parallel_losses(tmp_path, extra, args):
    if _gpus() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    one = _losses(tmp_path, "sp1", extra, *args)
    two = _losses(tmp_path, "sp2", extra, *args, "distributed.sequence_parallel_size=2")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-3), step
