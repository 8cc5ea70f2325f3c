"""Relative paths in a spec resolve from the spec file's directory; overrides from the working directory
(issue 24)."""

from __future__ import annotations

import os
from pathlib import Path

from distsft.config.paths import resolve_paths


def test_spec_paths_resolve_from_the_spec_directory(tmp_path) -> None:
    spec_dir, cwd = tmp_path / "project", tmp_path / "elsewhere"
    (spec_dir / "data").mkdir(parents=True)
    (spec_dir / "tok").mkdir()
    cwd.mkdir()
    raw = {"model": {"name_or_path": "tok"},
           "data": {"train_files": "data/train.jsonl", "eval_files": ["data/eval.jsonl", "org/hub-dataset"],
                    "sources": [{"path": "./x.parquet", "dataset_info": "data/dataset_info.json#demo"}],
                    "chat_template": "templates/chatml.jinja", "cache_dir": "cache"},
           "checkpoint": {"resume": "never"}, "output_dir": "runs/a"}
    resolve_paths(raw, spec_dir, cwd=cwd)
    d = raw["data"]
    assert raw["model"]["name_or_path"] == str(spec_dir / "tok")
    assert d["train_files"] == str(spec_dir / "data" / "train.jsonl")
    # a hub id that names nothing local stays a hub id
    assert d["eval_files"] == [str(spec_dir / "data" / "eval.jsonl"), "org/hub-dataset"]
    assert d["sources"][0] == {"path": str(spec_dir / "x.parquet"),
                               "dataset_info": f"{spec_dir / 'data' / 'dataset_info.json'}#demo"}
    # a missing template path still resolves, so the error names the file the spec meant
    assert d["chat_template"] == str(spec_dir / "templates" / "chatml.jinja")
    assert d["cache_dir"] == str(spec_dir / "cache") and raw["output_dir"] == str(spec_dir / "runs" / "a")
    assert raw["checkpoint"]["resume"] == "never"


def test_names_and_inline_templates_and_hub_models_are_not_paths(tmp_path) -> None:
    raw = {"model": {"name_or_path": "Qwen/Qwen3-0.6B"}, "data": {"chat_template": "chatml"}}
    resolve_paths(raw, tmp_path, cwd=tmp_path)
    assert raw == {"model": {"name_or_path": "Qwen/Qwen3-0.6B"}, "data": {"chat_template": "chatml"}}
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    raw = {"data": {"chat_template": inline}}
    resolve_paths(raw, tmp_path)
    assert raw["data"]["chat_template"] == inline


def test_overrides_resolve_from_the_working_directory(tmp_path) -> None:
    raw = {"data": {"train_files": ["a.jsonl"], "chat_template": "t.jinja"}, "output_dir": "out"}
    touched = {("data", "train_files"), ("output_dir",)}
    resolve_paths(raw, tmp_path / "spec_dir", touched, cwd=tmp_path / "shell")
    assert raw["data"]["train_files"] == [str(tmp_path / "shell" / "a.jsonl")]
    assert raw["output_dir"] == str(tmp_path / "shell" / "out")
    assert raw["data"]["chat_template"] == str(tmp_path / "spec_dir" / "t.jinja")  # from the file: spec dir


def test_absolute_paths_stay(tmp_path) -> None:
    raw = {"data": {"train_files": [str(tmp_path / "a.jsonl")]}, "output_dir": str(tmp_path / "o")}
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    resolve_paths(raw, Path(os.sep) / "nowhere")
    assert raw == before
