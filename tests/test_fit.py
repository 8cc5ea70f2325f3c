"""What fits (plan.fit): the micro-batch `auto` resolves to keeps the global batch exact and grows with
the GPU's memory; the backend ladder init walks; and the exit-2 text when nothing fits names what would."""

import pytest

from distsft.config.spec import validate
from distsft.errors import SpecError
from distsft.plan import fit, memory


def llama_like(layers=32, h=4096, inter=14336, kv=1024, vocab=128256) -> memory.ModelShape:
    """An 8B Llama's shape, built by hand (no transformers needed)."""
    per_layer = [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
                 ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]
    linears = tuple((f"model.layers.{i}.{n}", a, b) for i in range(layers) for n, a, b in per_layer)
    n = sum(a * b for _, a, b in linears) + 2 * vocab * h + (2 * layers + 1) * h
    return memory.ModelShape(n, vocab * h, h, layers, vocab, linears)


SHAPE = llama_like()


def spec(train=None, distributed=None, peft=None, max_length=4096):
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["a.jsonl"], "max_length": max_length},
                     "train": train or {}, "distributed": distributed or {}, "peft": peft or {}})


def test_micro_candidates_keep_the_global_batch_exact():
    assert fit.micro_candidates(64, 8) == [8, 4, 2, 1]
    assert fit.micro_candidates(48, 8) == [6, 3, 2, 1]
    assert fit.micro_candidates(60, 8) == []


@pytest.mark.parametrize("gb", [40.0, 80.0, 141.0])
def test_resolved_micro_is_the_largest_that_fits(gb):
    s = spec({"global_batch_size": 64, "gradient_checkpointing": True},
             {"gpus_per_node": 8, "backend": "deepspeed", "zero_stage": 3})
    f = fit.resolve_micro(s, SHAPE, gb, 64)
    assert 64 % (f.micro * 8) == 0
    assert f.estimate_gb <= fit.usable_gb(gb)
    bigger = [m for m in fit.micro_candidates(64, 8) if m > f.micro]
    for m in bigger:  # every larger candidate is estimated over the budget
        assert fit.gb_for(s, SHAPE, "zero3", m, True) > fit.usable_gb(gb)


def test_more_memory_never_means_a_smaller_micro_batch():
    s = spec({"global_batch_size": 128, "gradient_checkpointing": True},
             {"gpus_per_node": 8, "backend": "deepspeed", "zero_stage": 3})
    micros = [fit.resolve_micro(s, SHAPE, gb, 128).micro for gb in (40, 80, 141, 200)]
    assert micros == sorted(micros) and micros[-1] > micros[0]


def test_backend_ladder_picks_the_least_that_fits():
    small = llama_like(layers=4, h=1024, inter=4096, kv=256, vocab=32000)
    assert fit.choose_backend(spec(distributed={"gpus_per_node": 8}), small, 80).label == "ddp"
    big = fit.choose_backend(spec(distributed={"gpus_per_node": 8}), SHAPE, 80)  # 8B full: 128 GB under DDP
    assert big.label in ("zero2", "zero3") and big.estimate_gb <= fit.usable_gb(80)
    lora = fit.choose_backend(spec(distributed={"gpus_per_node": 8}, peft={"method": "lora"}), SHAPE, 80)
    assert lora.label == "ddp"  # 16 GB of frozen bf16 weights fit replicated


def test_nothing_fits_names_what_would():
    s = spec({"global_batch_size": 8}, {"gpus_per_node": 8})
    with pytest.raises(SpecError) as info:
        fit.resolve_micro(s, SHAPE, 24, 8)
    msg = str(info.value)
    assert "does not fit" in msg and "24 GB" in msg and "what would fit" in msg
    assert "ZeRO-3" in msg or "FSDP2" in msg or "zero_stage: 3" in msg
    with pytest.raises(SpecError) as info:
        fit.choose_backend(spec(), SHAPE, 2)
    assert "nothing distsft offers fits" in str(info.value) or "what would fit" in str(info.value)


# ----------------------------------------------------------------------------- `auto` end to end
def test_auto_needs_a_global_batch():
    with pytest.raises(SpecError, match="auto needs train.global_batch_size"):
        spec({"per_device_train_batch_size": "auto"})


def test_auto_resolves_from_gpu_memory_gb_and_keeps_the_global_batch(tmp_path):
    """A bundled 8B model planned from this GPU-less machine for 8 x 80 GB: the micro-batch auto picks is
    the largest that fits and the global batch is exact; with less memory it is smaller."""
    from distsft.plan.batch import batch_for, pin_global_batch
    base = {"model": {"name_or_path": "meta-llama/Llama-3.1-8B"},
            "data": {"train_files": ["a.jsonl"], "max_length": 4096}, "output_dir": str(tmp_path),
            "train": {"per_device_train_batch_size": "auto", "global_batch_size": 64, "gradient_checkpointing": True},
            "distributed": {"gpus_per_node": 8, "backend": "deepspeed", "zero_stage": 3, "gpu_memory_gb": 80}}
    s80 = validate(base)
    b80 = batch_for(s80)
    assert b80.per_device_train_batch_size * b80.gradient_accumulation_steps * 8 == 64
    base["distributed"]["gpu_memory_gb"] = 40
    b40 = batch_for(validate(base))
    assert b40.per_device_train_batch_size < b80.per_device_train_batch_size and b40.global_batch_size == 64
    pinned = pin_global_batch(s80)  # run.yaml records the number, so a resume uses the same
    assert pinned.train.per_device_train_batch_size == b80.per_device_train_batch_size


def test_a_probed_micro_batch_in_the_output_dir_wins(tmp_path):
    import json
    from distsft import rundir
    from distsft.plan.batch import batch_for
    s = validate({"model": {"name_or_path": "meta-llama/Llama-3.1-8B"}, "data": {"train_files": ["a.jsonl"]},
                  "output_dir": str(tmp_path),
                  "train": {"per_device_train_batch_size": "auto", "global_batch_size": 64},
                  "distributed": {"gpus_per_node": 8, "backend": "fsdp", "gpu_memory_gb": 80}})
    (tmp_path / rundir.AUTO_BATCH).write_text(json.dumps({"per_device_train_batch_size": 2, "global_batch_size": 64,
                                                          "dp_world": 8}))
    assert batch_for(s).per_device_train_batch_size == 2


def test_auto_that_fits_nothing_is_exit_2_naming_what_would(tmp_path):
    import helpers as h
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("""
model: {name_or_path: Qwen/Qwen2.5-72B}
data: {train_files: [a.jsonl], max_length: 4096}
train: {per_device_train_batch_size: auto, global_batch_size: 64}
distributed: {gpus_per_node: 8, gpu_memory_gb: 24}
""")
    p = h.run("plan", spec_path, "--no-data")
    assert p.returncode == 2 and "does not fit" in p.stderr and "what would fit" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
