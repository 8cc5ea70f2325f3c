"""Time and GPU-hours before queueing (plan.estimate): the assumed figure's arithmetic, a measured figure
used when present (and only for the same model and hardware), and submit's time-limit verdict."""

import json
from types import SimpleNamespace

import pytest

import helpers as h
from distsft.config.spec import validate
from distsft.plan import estimate as est

BASE = {"model": {"name_or_path": "org/model"}, "data": {"train_files": ["a.jsonl"]}}


def spec(**sections):
    return validate({**BASE, **sections})


def plan(world=8, tokens_per_step=64 * 2048, total=1000, per_epoch=500):
    return SimpleNamespace(world_size=world, tokens_per_step=tokens_per_step, total_steps=total,
                           steps_per_epoch=per_epoch)


def test_assumed_estimate_is_tokens_times_flops_over_peak_times_mfu():
    s = spec(logging={"peak_tflops": 1000})
    e = est.estimate(s, plan(), matmul_params=7_000_000_000, trainable_params=7_000_000_000, device="cpu")
    fpt = 6 * 7e9
    tps = 1000e12 * est.ASSUMED_MFU / fpt
    assert e.source == "assumed" and e.tokens_per_second_per_gpu == pytest.approx(tps, rel=1e-4)
    assert e.hours == pytest.approx(64 * 2048 * 1000 / (tps * 8) / 3600, rel=1e-3)
    assert e.gpu_hours == pytest.approx(e.hours * 8, rel=1e-3)
    assert e.hours_per_epoch == pytest.approx(e.hours / 2, rel=1e-3)
    assert "assumed: 35% MFU of 1000 TFLOP/s" in e.basis and "peak from logging.peak_tflops" in e.basis


def test_checkpointing_and_offload_slow_the_assumed_estimate():
    base = est.estimate(spec(), plan(), matmul_params=10**9, trainable_params=10**9, device=None)
    ckpt = est.estimate(spec(train={"gradient_checkpointing": True}), plan(), matmul_params=10**9,
                        trainable_params=10**9, device=None)
    off = est.estimate(spec(distributed={"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True}), plan(),
                       matmul_params=10**9, trainable_params=10**9, device=None)
    assert ckpt.hours == pytest.approx(base.hours * 8 / 6, rel=1e-3)
    assert off.hours > base.hours
    assert "H100" in base.basis and "no GPU on this machine" in base.basis


def test_a_measured_record_wins_for_the_same_model_and_hardware(tmp_path):
    s = spec(output_dir=str(tmp_path))
    est.append_record(tmp_path, est.make_record(s, "sanity", "NVIDIA H100 80GB HBM3", 8, 3000.0, 4))
    est.append_record(tmp_path, est.make_record(s, "run", "NVIDIA H100 80GB HBM3", 8, 3500.0, 4))
    other = spec(model={"name_or_path": "org/other"})
    est.append_record(tmp_path, est.make_record(other, "run", "NVIDIA H100 80GB HBM3", 8, 99999.0, 4))
    recs = est.read_records(tmp_path)
    e = est.estimate(s, plan(), matmul_params=10**9, trainable_params=10**9, device="NVIDIA H100 80GB HBM3",
                     records=recs)
    assert e.source == "measured" and e.tokens_per_second_per_gpu == 3500.0  # the newest
    assert e.hours == pytest.approx(64 * 2048 * 1000 / (3500 * 8) / 3600, rel=1e-3)
    assert "measured by run on NVIDIA H100" in e.basis
    # another GPU here: the H100 figure does not apply
    a100 = est.estimate(s, plan(), matmul_params=10**9, trainable_params=10**9, device="NVIDIA A100-SXM4-80GB",
                        records=recs)
    assert a100.source == "assumed"
    # planning from a machine without a GPU: the GPU measurement is the job's best figure
    assert est.estimate(s, plan(), matmul_params=10**9, trainable_params=10**9, device="cpu",
                        records=recs).source == "measured"
    # LoRA is another workload
    lora = spec(output_dir=str(tmp_path), peft={"method": "lora"})
    assert est.estimate(lora, plan(), matmul_params=10**9, trainable_params=10**6, device="NVIDIA H100 80GB HBM3",
                        records=recs).source == "assumed"


def test_measured_throughput_skips_start_up_and_takes_the_median():
    metrics = [{"tokens_per_second": 10.0}, {"tokens_per_second": 100.0}, {"tokens_per_second": 110.0},
               {"tokens_per_second": 90.0}, {"eval_loss": 1.0}]
    assert est.measured_throughput(metrics, world_size=2) == pytest.approx(50.0)
    assert est.measured_throughput([], world_size=2) is None


def test_a_truncated_record_line_is_skipped(tmp_path):
    est.append_record(tmp_path, {"model": "m", "tokens_per_second_per_gpu": 5.0})
    with open(est.record_path(tmp_path), "a") as f:
        f.write('{"model": "m", "tokens_')
    assert len(est.read_records(tmp_path)) == 1


def test_time_limit_verdicts():
    assert est.time_limit_warning(0.5, 60, 3) is None
    fine = est.time_limit_warning(3.5, 60, 3)
    assert "requeued 3 time(s)" in fine and "fine" in fine
    bad = est.time_limit_warning(10, 60, 3)
    assert "will not finish" in bad and "needs 9 requeues" in bad and ">= 150 min" in bad


def test_plan_uses_a_measured_figure_in_the_output_dir(tmp_path):
    spec_path = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    p = json.loads(h.run("plan", spec_path, "--json", check=True).stdout)
    assert p["estimate"]["source"] == "assumed" and p["estimate"]["hours"] > 0
    rec = {"source": "sanity", "model": str(h.TINY), "peft_method": "none", "device": "cpu",
           "world_size": 1, "tokens_per_second_per_gpu": 1234.5}
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "throughput.jsonl").write_text(json.dumps({"time": 1, **rec}) + "\n")
    m = json.loads(h.run("plan", spec_path, "--json", check=True).stdout)["estimate"]
    assert m["source"] == "measured" and m["tokens_per_second_per_gpu"] == 1234.5
    assert m["hours"] == pytest.approx(p["estimate"]["hours"] * p["estimate"]["tokens_per_second_per_gpu"] / 1234.5,
                                       rel=1e-2)


@pytest.mark.slow
def test_sanity_and_a_run_record_their_throughput_and_plan_uses_it(tmp_path):
    """`distsft sanity` passes its checks on the tiny model (2 ranks), writes its measured tokens/s into
    the spec's output_dir and `plan` then says "measured"; a training run appends its own record."""
    spec_path = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    p = h.run("sanity", spec_path, "--gpus", "2", check=True)
    for check in ("assistant-only loss", "no out-of-memory", "loss falls", "generation works"):
        assert check in p.stdout, check
    assert "FAIL" not in p.stdout
    assert "[[" in p.stdout  # decoded examples with the loss-carrying tokens marked
    recs = [json.loads(x) for x in (tmp_path / "out" / "throughput.jsonl").read_text().splitlines()]
    assert recs[-1]["source"] == "sanity" and recs[-1]["tokens_per_second_per_gpu"] > 0
    assert recs[-1]["model"] == str(h.TINY) and recs[-1]["device"] == "cpu"
    e = json.loads(h.run("plan", spec_path, "--json", check=True).stdout)["estimate"]
    assert e["source"] == "measured" and e["tokens_per_second_per_gpu"] == pytest.approx(
        recs[-1]["tokens_per_second_per_gpu"], rel=1e-5)
    h.run("run", spec_path, check=True)
    recs = [json.loads(x) for x in (tmp_path / "out" / "throughput.jsonl").read_text().splitlines()]
    assert [r["source"] for r in recs] == ["sanity", "run"]
