"""The run spec: every user mistake is a SpecError naming the dotted key (and the YAML line)."""

from pathlib import Path

import pytest

from distsft.config.spec import RunSpec, dump_spec, load_spec
from distsft.errors import SpecError

BASE = "model:\n  name_or_path: m\ndata:\n  train_files: [a.jsonl]\n"  # lines 1-4


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def spec_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return str(info.value)


# (extra YAML after BASE, dotted keys the message must name, line of the offending key or section)
BAD_FILES = {
    "unknown key": ("train:\n  learnig_rate: 1e-5\n", ["train.learnig_rate"], 6),
    "unknown section": ("trian:\n  seed: 1\n", ["trian"], 5),
    "wrong type": ("train:\n  num_train_epochs: abc\n", ["train.num_train_epochs"], 6),
    "wrong type bool": ("data:\n  packing: maybe\n", ["data.packing"], None),
    "negative learning rate": ("train:\n  learning_rate: -1.0e-5\n", ["train.learning_rate"], 6),
    "zero stage 4": ("distributed:\n  backend: deepspeed\n  zero_stage: 4\n", ["distributed.zero_stage"], 7),
    "warmup ratio 1.5": ("train:\n  warmup_ratio: 1.5\n", ["train.warmup_ratio"], 6),
    "offload without deepspeed": ("distributed:\n  offload_optimizer: true\n",
                                  ["distributed.offload_optimizer", "deepspeed"], 5),
    "offload_params without stage 3": ("distributed:\n  backend: deepspeed\n  zero_stage: 2\n"
                                       "  offload_params: true\n", ["distributed.offload_params", "3"], 5),
    "accumulation and global batch": ("train:\n  gradient_accumulation_steps: 4\n  global_batch_size: 64\n",
                                      ["train.gradient_accumulation_steps", "train.global_batch_size"], 5),
    "zero stage under fsdp": ("distributed:\n  backend: fsdp\n  zero_stage: 2\n", ["distributed.zero_stage", "FSDP2"], 5),
    "offload_optimizer under fsdp": ("distributed:\n  backend: fsdp\n  offload_optimizer: true\n",
                                     ["distributed.offload_optimizer", "offload_params"], 5),
    "reshard_after_forward under ddp": ("distributed:\n  reshard_after_forward: false\n",
                                        ["distributed.reshard_after_forward", "fsdp"], 5),
    "zero stage under ddp": ("distributed:\n  zero_stage: 2\n", ["distributed.zero_stage", "deepspeed"], 5),
    "partition ;": ("slurm:\n  partition: 'gpu;rm -rf /'\n", ["slurm.partition"], 6),
    "partition backtick": ("slurm:\n  partition: 'gpu`id`'\n", ["slurm.partition"], 6),
    "job_name $()": ("slurm:\n  job_name: 'x$(id)'\n", ["slurm.job_name"], 6),
    "job_name newline": ('slurm:\n  job_name: "x\\nreboot"\n', ["slurm.job_name"], 6),
    "job_name backtick": ("slurm:\n  job_name: 'x`id`'\n", ["slurm.job_name"], 6),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_key_and_line(tmp_path, case):
    extra, keys, line = BAD_FILES[case]
    msg = spec_error(write(tmp_path, BASE + extra))
    for key in keys:
        assert key in msg, msg
    if line is not None:
        assert f"line {line}" in msg, msg


def test_missing_required_section(tmp_path):
    msg = spec_error(write(tmp_path, "data:\n  train_files: [a.jsonl]\n"))
    assert "model" in msg and "missing" in msg


def test_invalid_yaml_gives_line(tmp_path):
    msg = spec_error(write(tmp_path, BASE + "train:\n  seed: [1, 2\n"))
    assert "invalid YAML" in msg and "line 7" in msg


def test_tab_indented_yaml_gives_line(tmp_path):
    msg = spec_error(write(tmp_path, BASE + "train:\n\tseed: 1\n"))
    assert "invalid YAML" in msg and "line 6" in msg


def test_missing_file(tmp_path):
    msg = spec_error(tmp_path / "nope.yaml")
    assert "not found" in msg and "nope.yaml" in msg


def test_non_mapping_spec(tmp_path):
    assert "mapping" in spec_error(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("override, keys", [
    ("train.learnig_rate=1e-5", ["train.learnig_rate", "unknown key", "command-line override"]),
    ("train.learning_rate=fast", ["train.learning_rate", "command-line override"]),
    ("distributed.gpus_per_node=0", ["distributed.gpus_per_node", "command-line override"]),
    ("slurm.partition=a;b", ["slurm.partition"]),
    ("model.name_or_path.sub=1", ["name_or_path is not a section"]),
    ("no_equals_sign", ["section.key=value"]),
    ("=1", ["section.key=value"]),
])
def test_bad_override(tmp_path, override, keys):
    msg = spec_error(write(tmp_path, BASE), [override])
    for key in keys:
        assert key in msg, msg


def test_override_to_unknown_section(tmp_path):
    assert "bogus" in spec_error(write(tmp_path, BASE), ["bogus.x=1"])


def test_several_errors_reported_together(tmp_path):
    msg = spec_error(write(tmp_path, BASE + "train:\n  seed: x\n  warmup_ratio: 2\n"))
    assert "train.seed" in msg and "train.warmup_ratio" in msg


def test_defaults_full_fine_tuning(tmp_path):
    s = load_spec(write(tmp_path, BASE))
    t = s.train
    assert t.lr_scheduler_type == "cosine"
    assert t.warmup_ratio == 0.03
    assert t.weight_decay == 0.01
    assert t.max_grad_norm == 1.0
    assert t.learning_rate == 2e-5
    assert t.seed == 42
    assert t.bf16 is None and t.fp16 is False
    assert s.distributed.backend == "ddp" and s.distributed.stage == 0
    assert s.logging.report_to == ["jsonl"]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_learning_rate_lora(tmp_path, method):
    assert load_spec(write(tmp_path, BASE), [f"peft.method={method}"]).train.learning_rate == 1e-4


def test_explicit_learning_rate_kept_with_lora(tmp_path):
    s = load_spec(write(tmp_path, BASE), ["peft.method=lora", "train.learning_rate=3e-4"])
    assert s.train.learning_rate == 3e-4


def test_deepspeed_without_stage_means_zero2(tmp_path):
    assert load_spec(write(tmp_path, BASE), ["distributed.backend=deepspeed"]).distributed.stage == 2


def test_overrides_typed_by_schema(tmp_path):
    s = load_spec(write(tmp_path, BASE), ["train.learning_rate=1e-5", "output_dir=runs/try2",
                                          "data.train_files=[a.jsonl,b.jsonl]", "train.bf16=true",
                                          "distributed.gpus_per_node=4", "train.num_train_epochs=2"])
    assert isinstance(s.train.learning_rate, float) and s.train.learning_rate == 1e-5
    # paths given on the command line resolve from the working directory (issue 24)
    assert s.output_dir == str(Path.cwd() / "runs" / "try2")
    assert s.data.train_files == [str(Path.cwd() / "a.jsonl"), str(Path.cwd() / "b.jsonl")]
    assert s.train.bf16 is True
    assert s.distributed.gpus_per_node == 4
    assert s.train.num_train_epochs == 2.0


def test_single_train_file_becomes_list(tmp_path):
    assert load_spec(write(tmp_path, BASE), ["data.train_files=c.jsonl"]).data.train_files == [str(Path.cwd() / "c.jsonl")]
    # in the file, from the spec's directory
    assert load_spec(write(tmp_path, BASE.replace("[a.jsonl]", "d.jsonl"))).data.train_files == [str(tmp_path / "d.jsonl")]


def test_override_beats_file(tmp_path):
    s = load_spec(write(tmp_path, BASE + "train:\n  seed: 1\n"), ["train.seed=7"])
    assert s.train.seed == 7


def test_nodes_gpus_flags(tmp_path):
    s = load_spec(write(tmp_path, BASE + "distributed:\n  nodes: 1\n  gpus_per_node: 8\n"), nodes=2, gpus=4)
    assert (s.distributed.nodes, s.distributed.gpus_per_node) == (2, 4)


def test_dump_roundtrip(tmp_path):
    s = load_spec(write(tmp_path, BASE), ["peft.method=lora", "distributed.backend=deepspeed"])
    dump_spec(s, tmp_path / "out.yaml")
    again = load_spec(tmp_path / "out.yaml")
    assert again == s and isinstance(again, RunSpec)


def test_examples_load():
    root = Path(__file__).resolve().parents[1] / "examples" / "configs"
    names = sorted(p.stem for p in root.glob("*.yaml"))
    assert {"ddp", "zero2", "zero3", "zero3_offload", "two_node"} <= set(names)
    for name in names:
        load_spec(root / f"{name}.yaml")
