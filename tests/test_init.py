"""`distsft init`: for every bundled model the written spec validates and plans as written, with values
inside the recommended ranges; local directories, data sniffing and bad input (exit 2, one line)."""

import json

import pytest
import yaml

import helpers as h
from distsft.config.spec import load_spec
from distsft.errors import SpecError
from distsft.launch import init
from distsft.plan import models, recommend
from distsft.plan.batch import batch_for

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def _methods():
    # every bundled model with full fine-tuning; LoRA and QLoRA on a spread of sizes
    out = [(stem, "full") for stem in models.all_stems()]
    out += [(s, m) for s in ("qwen2.5-7b", "llama-3.1-70b", "qwen3-30b-a3b", "gemma-3-27b", "smollm2-135m")
            for m in ("lora", "qlora")]
    return out


@pytest.mark.parametrize("stem,method", _methods())
def test_every_bundled_model_inits_into_the_table(tmp_path, stem, method):
    out = tmp_path / "run.yaml"
    text, raw, _ = init.build(stem, method, nodes=1, gpus=8, gpu_memory_gb=80, out=out)
    init.write(text, out)
    spec = load_spec(out)  # validates as written
    b = batch_for(spec)
    assert b.global_batch_size == b.per_device_train_batch_size * b.gradient_accumulation_steps * b.world_size
    n = init.shape_of(init.resolve_model(stem)).num_parameters
    c = recommend.size_class(n)
    lo, hi = recommend.learning_rate_range(n, spec.peft.method)
    assert lo <= spec.train.learning_rate <= hi
    assert c.effective_batch[0] <= b.global_batch_size <= c.effective_batch[1]
    assert recommend.warnings(spec, n, b.global_batch_size) == []
    assert spec.distributed.gpu_memory_gb == 80
    # every chosen value carries a comment
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and not line.rstrip().endswith(":"):
            key = line.split(":")[0].strip(" -")
            if key not in ("nodes", "gpus_per_node", "split", "path"):
                assert "  # " in line, line


def test_init_then_plan_reads_the_data_and_estimates_time(tmp_path):
    """A local model directory and a local data file: plan reads the data and gives a time estimate."""
    out = tmp_path / "run.yaml"
    p = h.run("init", "--model", h.TINY, "--data", h.TRAIN, "--gpus", "2", "--gpu-memory-gb", "16",
              "--out", out, check=True)
    assert "wrote" in p.stdout and p.stderr.strip() == "", p.stderr
    text = out.read_text()
    assert "format: messages  # sniffed" in text
    raw = yaml.safe_load(text)
    raw["output_dir"] = str(tmp_path / "o")
    raw["data"]["max_length"] = 256
    out.write_text(yaml.safe_dump(raw))
    plan = h.run("plan", out, "--json", check=True)
    d = json.loads(plan.stdout)
    assert d["num_tokens"] and d["estimate"]["source"] == "assumed"
    assert d["estimate"]["hours"] > 0 and d["estimate"]["gpu_hours"] == pytest.approx(d["estimate"]["hours"] * 2, rel=1e-3)


def test_bundled_hub_id_plans_offline_with_the_data_not_read(tmp_path):
    out = tmp_path / "run.yaml"
    h.run("init", "--model", "Qwen/Qwen2.5-7B-Instruct", "--method", "lora", "--out", out, check=True)
    p = h.run("plan", out, "--json", check=True)
    d = json.loads(p.stdout)
    assert d["memory"]["num_parameters"] > 7e9  # the bundled config, no download
    assert d["data_note"]  # the hub model's tokenizer is not in the cache here: "not read", exit 0


@pytest.mark.parametrize("records,fmt", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "messages"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}], "sharegpt"),
    ([{"instruction": "a", "input": "", "output": "b"}], "instruction"),
    ([{"prompt": "a", "completion": "b"}], "prompt_completion"),
    ([{"text": "a b c"}], "text"),
])
def test_data_format_is_sniffed(tmp_path, records, fmt):
    from distsft.data.sniff import sniff
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records * 3))
    assert sniff(f, "--data d.jsonl").format == fmt


def test_ambiguous_or_unknown_data_is_refused(tmp_path):
    from distsft.data.sniff import sniff
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}], "text": "x"}) + "\n")
    with pytest.raises(SpecError, match="more than one data.format"):
        sniff(both, "--data both.jsonl")
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(SpecError, match=r"none.jsonl:1: no data.format fits .*'answer', 'question'"):
        sniff(none, "--data none.jsonl")


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama-9000"], "unknown model family"),
    (["--model", "someorg/not-bundled-model"], "pass a local directory"),
    (["--model", "Qwen/Qwen2.5-72B", "--gpus", "1", "--gpu-memory-gb", "1"], "does not fit"),
    (["--model", "Qwen/Qwen2.5-7B", "--data", "missing.jsonl"], "file not found"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    p = h.run("init", *args, "--out", tmp_path / "run.yaml")
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run.yaml").exists()


def test_model_directory_without_config_is_exit_2(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SpecError, match="no config.json"):
        init.resolve_model(str(tmp_path / "m"))


def test_a_file_init_did_not_write_is_never_overwritten(tmp_path):
    mine = tmp_path / "run.yaml"
    mine.write_text("model: {name_or_path: x}\n")
    with pytest.raises(SpecError, match="not written by distsft init"):
        init.write("# written by distsft init\n", mine)
    assert mine.read_text() == "model: {name_or_path: x}\n"
    ours = tmp_path / "ours.yaml"
    init.write("# written by distsft init: a\n", ours)
    init.write("# written by distsft init: b\n", ours)  # rewriting init's own file is fine
    assert ours.read_text().endswith("b\n")


def test_bundled_configs_match_their_published_sizes():
    """Each bundled config builds on the meta device to the parameter count its model card gives."""
    for stem in models.all_stems():
        entry = models.index()[stem]
        published = entry["published_parameters"].split()[0]
        want = float(published[:-1]) * (1e9 if published.endswith("B") else 1e6)
        got = init.shape_of(init.resolve_model(stem)).num_parameters
        assert abs(got - want) / want < 0.02, (stem, got, want)
