"""Batch arithmetic, steps and warmup; a property test over generated raw specs."""

import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distsft.plan.batch import Batch, batch_for, pin_global_batch, resolve_batch, steps, valid_global_batches, warmup_steps
from distsft.plan.report import make_plan
from distsft.config.spec import RunSpec, load_spec, validate
from distsft.errors import SpecError

BASE = {"model": {"name_or_path": "m"}, "data": {"train_files": ["a.jsonl"]}}
STATS = {"num_rows": 1000, "num_examples": 1500, "num_tokens": 2_000_000, "packing_efficiency": 0.95}


def spec(train: dict | None = None, distributed: dict | None = None, **sections) -> RunSpec:
    return validate({**BASE, "train": train or {}, "distributed": distributed or {}, **sections})


def test_accumulation_derived_from_global_batch():
    assert resolve_batch(2, 8, global_batch=128) == Batch(8, 2, 8, 128)
    assert resolve_batch(4, 16, global_batch=128) == Batch(16, 4, 2, 128)
    assert resolve_batch(1, 1, global_batch=7) == Batch(1, 1, 7, 7)


def test_global_batch_derived_from_accumulation():
    assert resolve_batch(2, 8, accum=4) == Batch(8, 2, 4, 64)
    assert resolve_batch(3, 2) == Batch(2, 3, 1, 6)


def test_same_spec_keeps_global_batch_on_any_gpu_count():
    s = spec({"per_device_train_batch_size": 2, "global_batch_size": 64})
    for world in (1, 2, 4, 8, 16, 32):
        b = batch_for(s, world)
        assert b.global_batch_size == 64 and b.per_device_train_batch_size * b.gradient_accumulation_steps * world == 64


def test_indivisible_message_names_keys_numbers_and_nearest():
    with pytest.raises(SpecError) as info:
        resolve_batch(2, 8, global_batch=100)
    msg = str(info.value)
    for part in ("train.global_batch_size=100", "train.per_device_train_batch_size (2)", "world size (8 GPUs)",
                 "= 16", "train.gradient_accumulation_steps", "96, 112"):
        assert part in msg, msg


def test_indivisible_below_one_unit_suggests_the_unit():
    with pytest.raises(SpecError) as info:
        resolve_batch(4, 8, global_batch=16)
    assert "nearest valid global batch sizes: 32" in str(info.value)


def test_valid_global_batches():
    assert valid_global_batches(2, 8, 100) == [96, 112]
    assert valid_global_batches(2, 8, 5) == [16]
    assert all(b % 16 == 0 for b in valid_global_batches(2, 8, 1000, count=5))


def test_nodes_gpus_flags_change_world_and_accumulation(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model: {name_or_path: m}\ndata: {train_files: [a.jsonl]}\n"
                 "train: {per_device_train_batch_size: 2, global_batch_size: 128}\n"
                 "distributed: {nodes: 1, gpus_per_node: 8}\n")
    assert batch_for(load_spec(p)) == Batch(8, 2, 8, 128)
    assert batch_for(load_spec(p, nodes=2)) == Batch(16, 2, 4, 128)
    assert batch_for(load_spec(p, nodes=2, gpus=4)) == Batch(8, 2, 8, 128)
    with pytest.raises(SpecError, match="96, 144|not divisible"):
        batch_for(load_spec(p, gpus=3))


def test_steps_and_warmup():
    assert steps(1000, 64, 2.0, -1) == (15, 30)  # the partial last batch is dropped
    assert steps(1000, 64, 0.5, -1) == (15, 8)   # fractional epochs round up
    assert steps(1000, 64, 0.01, -1) == (15, 1)  # never zero steps
    assert steps(1000, 64, 3.0, 7) == (15, 7)    # max_steps wins
    assert warmup_steps(30, 0.03) == 1
    assert warmup_steps(1000, 0.03) == 30
    assert warmup_steps(1000, 0.0) == 0


def test_fewer_rows_than_one_global_batch():
    with pytest.raises(SpecError, match="fewer than one global batch of 64"):
        steps(63, 64, 1.0, -1)


def test_make_plan_with_data():
    s = spec({"per_device_train_batch_size": 2, "global_batch_size": 64, "num_train_epochs": 2},
             {"gpus_per_node": 4, "backend": "deepspeed", "zero_stage": 3})
    p = make_plan(s, STATS)
    assert (p.world_size, p.gradient_accumulation_steps, p.global_batch_size) == (4, 8, 64)
    assert (p.backend, p.zero_stage) == ("deepspeed", 3)
    assert (p.steps_per_epoch, p.total_steps, p.warmup_steps) == (15, 30, 1)
    assert p.tokens_per_step == pytest.approx(2_000_000 / 1000 * 64)
    assert p.learning_rate == 2e-5


def test_make_plan_without_data_uses_max_steps():
    p = make_plan(spec({"max_steps": 200}))
    assert (p.total_steps, p.warmup_steps, p.steps_per_epoch) == (200, 6, None)
    assert make_plan(spec()).total_steps is None


def test_pin_global_batch_records_global_not_accumulation():
    s = spec({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}, {"gpus_per_node": 8})
    pinned = pin_global_batch(s)
    assert (pinned.train.global_batch_size, pinned.train.gradient_accumulation_steps) == (64, None)
    assert s.train.gradient_accumulation_steps == 4  # the input is not modified
    assert batch_for(pinned, 4) == Batch(4, 2, 8, 64)


def test_hyperparameter_hints():
    p = make_plan(spec({"learning_rate": 0.1, "warmup_ratio": 0.5}))
    assert any("train.learning_rate" in w for w in p.warnings)
    assert any("warmup_ratio" in w for w in p.warnings)
    assert make_plan(spec(), STATS).warnings == []


# --------------------------------------------------------------------------- property test

SECTION_KEYS = {name: set(model.model_fields) for name, model in
                ((n, RunSpec.model_fields[n].annotation) for n in ("train", "distributed"))}
UNKNOWN = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10)


FIELDS = ["micro", "accum", "global", "both", "nodes", "gpus", "stage", "warmup", "lr", "epochs", "max_steps",
          "unknown"]


@st.composite
def raw_specs(draw):
    """A raw spec dict, data stats and the oracle's verdict: None when the plan must succeed, else
    which check should fail. A few fields at a time are drawn from their invalid range, so valid and
    invalid specs both come up often."""
    broken = draw(st.sets(st.sampled_from(FIELDS), max_size=2))

    def pick(field, valid, invalid):
        return draw(invalid if field in broken else valid)

    micro = pick("micro", st.integers(1, 8), st.integers(-1, 0))
    mode = "both" if "both" in broken else draw(st.sampled_from(["accum", "global", "neither"]))
    accum = pick("accum", st.integers(1, 8), st.integers(-1, 0)) if mode in ("accum", "both") else None
    glob = pick("global", st.integers(1, 300), st.integers(-4, 0)) if mode in ("global", "both") else None
    nodes = pick("nodes", st.integers(1, 4), st.just(0))
    gpus = pick("gpus", st.integers(1, 8), st.just(0))
    backend = draw(st.sampled_from(["ddp", "deepspeed"]))
    valid_stage = st.none() | (st.integers(0, 3) if backend == "deepspeed" else st.just(0))
    stage = pick("stage", valid_stage, st.sampled_from([-1, 4, 5] + ([1, 2, 3] if backend == "ddp" else [])))
    warmup = pick("warmup", st.floats(0, 0.99), st.floats(-0.5, -1e-9) | st.floats(1.0, 1.5))
    lr = pick("lr", st.none() | st.floats(0, 1e-2), st.floats(-1e-3, -1e-12))
    epochs = pick("epochs", st.sampled_from([0.5, 1.0, 3.0]), st.sampled_from([-1.0, 0.0]))
    max_steps = pick("max_steps", st.sampled_from([-1, 5, 50]), st.sampled_from([-2, 0]))
    unknown = draw(st.tuples(st.sampled_from(["train", "distributed", None]), UNKNOWN)) if "unknown" in broken else None
    rows = draw(st.integers(0, 5000))

    train = {"per_device_train_batch_size": micro, "warmup_ratio": warmup, "num_train_epochs": epochs,
             "max_steps": max_steps}
    if accum is not None:
        train["gradient_accumulation_steps"] = accum
    if glob is not None:
        train["global_batch_size"] = glob
    if lr is not None:
        train["learning_rate"] = lr
    dist = {"nodes": nodes, "gpus_per_node": gpus, "backend": backend}
    if stage is not None:
        dist["zero_stage"] = stage
    raw = {**BASE, "train": train, "distributed": dist}
    bad_key = False
    if unknown is not None:
        section, key = unknown
        known = SECTION_KEYS.get(section, set(RunSpec.model_fields))
        bad_key = key not in known
        if key not in known:  # a known key would change the verdict in ways the oracle does not model
            (raw[section] if section else raw)[key] = 1

    invalid_spec = (micro < 1 or (accum is not None and accum < 1) or (glob is not None and glob < 1)
                    or (accum is not None and glob is not None) or nodes < 1 or gpus < 1
                    or (stage is not None and not 0 <= stage <= 3)
                    or (backend == "ddp" and stage not in (None, 0)) or not 0 <= warmup < 1
                    or (lr is not None and lr < 0) or epochs <= 0 or max_steps in (0, -2) or bad_key)
    verdict = None
    if invalid_spec:
        verdict = "spec"
    else:
        world = nodes * gpus
        eff_global = glob if glob is not None else micro * (accum or 1) * world
        if glob is not None and glob % (micro * world):
            verdict = "batch"
        elif rows // eff_global == 0:  # with max_steps too (issue 14): no step has a full batch
            verdict = "data"
    stats = {"num_rows": rows, "num_examples": rows, "num_tokens": rows * 50, "packing_efficiency": 1.0}
    return raw, stats, verdict


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_specs())
def test_property_valid_specs_plan_exactly_and_invalid_ones_raise_spec_error(case):
    raw, stats, verdict = case
    try:
        s = validate(raw)
        p = make_plan(s, stats)
    except SpecError as exc:  # any other exception type fails the test
        assert str(exc).strip()
        assert verdict is not None, f"unexpected SpecError for a valid spec: {exc}"
        return
    assert verdict is None, f"expected a {verdict} error, got a plan"
    assert p.per_device_train_batch_size * p.gradient_accumulation_steps * p.world_size == p.global_batch_size
    assert p.gradient_accumulation_steps >= 1
    assert p.total_steps is not None and p.total_steps >= 1
    assert 0 <= p.warmup_steps <= p.total_steps
    assert p.warmup_steps == math.ceil(p.total_steps * s.train.warmup_ratio)
    if raw["train"].get("global_batch_size"):
        assert p.global_batch_size == raw["train"]["global_batch_size"]
