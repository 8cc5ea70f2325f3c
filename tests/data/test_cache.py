"""The source-key index: a warm `distsft run` finds its packed data without loading the tokenizer, and
any change to what the cache key covers (tokenizer files, chat template file, data, settings) misses."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distsft.data import build as data
from distsft.runtime import hardware
from distsft.data import cache as data_cache
from distsft.config.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def setup(tmp_path):
    """A copy of the tiny model and of the data, so a test can change them; a spec that uses both."""
    model = tmp_path / "model"
    shutil.copytree(EXAMPLES / "tiny-llama", model)
    train = tmp_path / "train.jsonl"
    train.write_text("".join((EXAMPLES / "data" / "train.jsonl").read_text().splitlines(True)[:200]))
    template = tmp_path / "template.jinja"
    template.write_text((model / "chat_template.jinja").read_text())
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(textwrap.dedent(f"""
        model: {{name_or_path: {model}}}
        data: {{train_files: [{train}], max_length: 128, chat_template: {template}, cache_dir: {tmp_path / 'cache'}}}
        train: {{per_device_train_batch_size: 2, global_batch_size: 4, max_steps: 2, bf16: false}}
        output_dir: {tmp_path / 'out'}
        """))
    return {"spec_file": spec_file, "model": model, "train": train, "template": template, "cache": tmp_path / "cache"}


def _spec(setup, *overrides):
    return load_spec(setup["spec_file"], list(overrides), gpus=1)


def _build(spec):
    from distsft.train.tokens import load_tokenizer
    return data.load_or_build(spec, load_tokenizer(spec), "train", data_cache.default_cache_root(spec))[1]


def test_index_gives_the_stats_of_the_cached_split_without_a_tokenizer(setup):
    spec = _spec(setup)
    assert data_cache.cached_stats(spec, "train", setup["cache"]) is None  # nothing built yet
    stats = _build(spec)
    assert data_cache.cached_stats(spec, "train", setup["cache"]) == stats
    assert data_cache.cached_stats(_spec(setup), "train", setup["cache"]) == stats  # same sources, new spec object
    assert data_cache.cached_stats(spec.data, "train", setup["cache"]) is None  # a DataSpec names no tokenizer


@pytest.mark.parametrize("change", ["tokenizer_file", "new_model_file", "template_file", "data_file", "setting"])
def test_a_change_to_any_source_misses_the_index(setup, change):
    spec = _spec(setup)
    _build(spec)
    overrides = []
    if change == "tokenizer_file":
        cfg = setup["model"] / "tokenizer_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 77}))
    elif change == "new_model_file":
        (setup["model"] / "special_tokens_map.json").write_text("{}")
    elif change == "template_file":
        setup["template"].write_text(setup["template"].read_text() + "\n")
    elif change == "data_file":
        with setup["train"].open("a") as f:
            f.write((EXAMPLES / "data" / "eval.jsonl").read_text().splitlines(True)[0])
    else:
        overrides = ["data.max_length=96"]
    assert data_cache.cached_stats(_spec(setup, *overrides), "train", setup["cache"]) is None


def test_weights_do_not_count(setup):
    spec = _spec(setup)
    stats = _build(spec)
    (setup["model"] / "model.safetensors").write_bytes(b"changed weights do not change the tokens")
    assert data_cache.cached_stats(spec, "train", setup["cache"]) == stats


def test_a_stale_index_entry_is_never_trusted_over_the_cache(setup):
    spec = _spec(setup)
    _build(spec)
    key = data_cache.source_key(spec, "train")
    (setup["cache"] / data_cache.INDEX_DIR / key).write_text("train-does-not-exist")
    assert data_cache.cached_stats(spec, "train", setup["cache"]) is None


def test_an_index_that_cannot_be_written_only_loses_the_shortcut(setup):
    setup["cache"].mkdir()
    (setup["cache"] / data_cache.INDEX_DIR).write_text("a file where the index directory should be")
    spec = _spec(setup)
    stats = _build(spec)  # packs and caches; recording the index fails quietly
    assert stats["num_rows"] > 0 and data_cache.cached_stats(spec, "train", setup["cache"]) is None


def test_hub_model_keys_on_its_cached_snapshot(setup, monkeypatch, tmp_path):
    import huggingface_hub.constants
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    spec = _spec(setup, "model.name_or_path=some-org/some-model")
    assert data_cache.source_key(spec, "train") is None  # not downloaded: only loading the tokenizer can tell
    repo = hub / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    shutil.copytree(setup["model"], repo / "snapshots" / "c0ffee")
    key = data_cache.source_key(spec, "train")
    assert key is not None and key == data_cache.source_key(spec, "train")
    (repo / "snapshots" / "c0ffee" / "tokenizer.json").write_text("{}")
    assert data_cache.source_key(spec, "train") != key


def _launcher_prepare(setup, *overrides):
    """launcher.prepare in a fresh interpreter: (stats, heavy modules it imported)."""
    code = textwrap.dedent(f"""
        import json, sys
        from distsft.launch import local as launcher
        from distsft.config.spec import load_spec
        spec = load_spec({str(setup['spec_file'])!r}, {list(overrides)!r}, gpus=1)
        stats = launcher.ready_for_ranks(spec, cuda=False)
        heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
        print(json.dumps({{"stats": stats, "heavy": heavy}}))
        """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_launcher_warm_path_imports_no_ml_library(setup):
    cold = _launcher_prepare(setup)
    assert cold["heavy"] == ["datasets", "torch", "transformers"]  # built: tokenizer loaded
    warm = _launcher_prepare(setup)
    assert warm == {"stats": cold["stats"], "heavy": []}
    # A changed source goes the slow way again, and gets the stats of the new data.
    changed = _launcher_prepare(setup, "data.max_length=64")
    assert changed["heavy"] and changed["stats"]["max_length"] == 64 != cold["stats"]["max_length"]


def test_gpu_probe_agrees_with_torch():
    import torch
    assert hardware.cuda_info()[0] == torch.cuda.is_available()
    if not hardware.gpu_driver_present():
        assert hardware.cuda_info() == (False, False, 0) and hardware.device_count() == 0
        assert hardware.choose_attn("auto") == "sdpa"
        with pytest.raises(Exception, match="flash_attention_2 cannot run here: no CUDA device"):
            hardware.choose_attn("flash_attention_2")
