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


def _auto_spec(tmp_path, model="meta-llama/Llama-3.1-8B", **distributed):
    from distsft.config.spec import validate
    return validate({"model": {"name_or_path": model}, "data": {"train_files": ["a.jsonl"]},
                     "output_dir": str(tmp_path),
                     "train": {"per_device_train_batch_size": "auto", "global_batch_size": 64},
                     "distributed": {"gpus_per_node": 8, "gpu_memory_gb": 80, **distributed}})


def test_confirm_runs_the_real_model_on_the_longest_row_and_lowers_on_out_of_memory(tiny_model_dir, tmp_path):
    """The recipe's probe on CPU with the tiny model: the step is the real forward/backward; the stand-in
    only enforces CUDA's contract (torch.OutOfMemoryError above a number of tokens in the micro-batch),
    which CPU memory never raises."""
    from transformers import AutoModelForCausalLM
    from distsft.data.collate import PackedCollator
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n)), "seq_lengths": [n]}
            for n in (40, 120, 64)]
    collate = PackedCollator(0, "sdpa")
    ran = []

    def step_for(model, collate, row, device):
        real = autobatch.forward_backward(model, collate, row, device)

        def step(micro):
            if micro * len(row["input_ids"]) > 300:  # the stand-in GPU holds 300 tokens
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            real(micro)
            ran.append((micro, len(row["input_ids"])))
        return step

    micro, line = autobatch.confirm(_auto_spec(tmp_path), model, rows, collate, torch.device("cpu"), 8,
                                    micro_candidates(64, 8), step_for=step_for)
    assert micro == 2 and ran == [(2, 120)]  # 8 and 4 rows of 120 tokens do not fit; 2 does, on the longest row
    assert "lowered from the estimate's 8" in line and "120 tokens" in line
    assert all(p.grad is None for p in model.parameters())  # training starts from released gradients


def test_the_probe_runs_only_where_the_bare_model_is_the_training_step(tmp_path):
    assert autobatch.not_probed(_auto_spec(tmp_path, backend="ddp"), True, 1) is None
    assert "no GPU" in autobatch.not_probed(_auto_spec(tmp_path, backend="ddp"), False, 1)
    assert "deepspeed" in autobatch.not_probed(_auto_spec(tmp_path, backend="deepspeed"), True, 1)
    assert "fsdp" in autobatch.not_probed(_auto_spec(tmp_path, backend="fsdp"), True, 1)


def test_over_budget_after_the_optimizer_states_counts_as_out_of_memory(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert autobatch.optimizer_extra_bytes(model, "adamw_torch") == 12 * n
    assert autobatch.optimizer_extra_bytes(model, "paged_adamw_8bit") == 6 * n
    assert autobatch.is_oom(autobatch.OverBudget("peak + optimizer over the GPU"))


def test_the_probes_record_is_what_a_resume_reads_and_keeps_the_global_batch(tmp_path):
    from distsft.launch.run_files import write_run_dir
    from distsft.plan import fit
    from distsft.plan.batch import batch_for
    spec = _auto_spec(tmp_path, "Qwen/Qwen2.5-0.5B", backend="ddp")
    estimated = batch_for(spec, world_size=8).per_device_train_batch_size
    assert estimated == 8 and not fit.auto_requested(spec.model_copy(update={"train": spec.train.model_copy(
        update={"per_device_train_batch_size": 8})}), 8)
    # The launcher pins the estimate into run.yaml and records it as unconfirmed: the ranks will probe.
    write_run_dir(spec, tmp_path, cuda=True, bf16_supported=True)
    pinned = spec.model_copy(update={"train": spec.train.model_copy(update={"per_device_train_batch_size": 8})})
    assert fit.auto_requested(pinned, 8) and fit.probed_micro(pinned, 8) is None
    # Rank 0 records what the probe settled on; the next launch (a resume) pins that instead.
    fit.record_auto(spec, 8, 1, estimated, probed=True)
    assert batch_for(spec, world_size=8).per_device_train_batch_size == estimated  # remembered until told
    fit.forget_resolved()
    b = batch_for(spec, world_size=8)
    assert (b.per_device_train_batch_size, b.gradient_accumulation_steps) == (1, 8)  # 1 x 8 x 8 = 64
    write_run_dir(spec, tmp_path, cuda=True, bf16_supported=True)
    import yaml
    assert yaml.safe_load((tmp_path / "run.yaml").read_text())["train"]["per_device_train_batch_size"] == 1
    assert fit.probed_micro(spec, 8) == 1
    assert fit.probed_micro(spec, 4) is None and not fit.auto_requested(pinned, 4)  # another width: re-derived
