"""The GPU probe of `per_device_train_batch_size: auto` (train.autobatch): halving on out-of-memory keeps
the global batch exact; on a GPU one real forward/backward confirms it (gpu-marked)."""

import pytest
import torch

from distsft.errors import SpecError
from distsft.plan.fit import micro_candidates
from distsft.train import autobatch


class FakeOOM(RuntimeError):
    pass


def test_probe_halves_to_a_divisor_until_it_fits():
    cands = micro_candidates(96, 4)  # share 24: 24, 12, 8, 6, 4, 3, 2, 1
    seen = []

    def step(m):
        seen.append(m)
        if m > 5:  # the real GPU holds at most 5
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")

    got = autobatch.probe(step, 24, cands, oom=lambda e: isinstance(e, FakeOOM))
    assert seen == [24, 12, 6, 3] and got == 3 and 96 % (got * 4) == 0


def test_probe_re_raises_what_is_not_out_of_memory():
    def step(m):
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError):
        autobatch.probe(step, 4, [4, 2, 1], oom=lambda e: isinstance(e, FakeOOM))


def test_probe_names_what_would_help_when_even_one_fails():
    def step(m):
        raise FakeOOM("out of memory")
    with pytest.raises(SpecError, match="even at a micro-batch of 1.*tried 8, 4, 2, 1.*gradient checkpointing"):
        autobatch.probe(step, 8, [8, 4, 2, 1], oom=lambda e: isinstance(e, FakeOOM))


def test_torch_out_of_memory_is_recognised():
    assert autobatch.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not autobatch.is_oom(ValueError("x"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_on_a_real_gpu_finds_a_micro_batch_that_runs(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    row = {"input_ids": list(range(1, 257)), "labels": list(range(1, 257)), "position_ids": list(range(256))}

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    step = autobatch.forward_backward(model, collate, row, torch.device("cuda"))
    got = autobatch.probe(step, 8, [8, 4, 2, 1])
    assert got == 8  # a tiny model fits; the step really ran forward and backward
    assert all(p.grad is None for p in model.parameters())  # released for training
