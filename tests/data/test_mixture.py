"""Mixtures of real files in different formats, eval sets, the validation hold-out, num_proc equivalence
and bad sources: the streaming build end to end (tiny tokenizer, real files on disk)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from distsft.data import build as data
from distsft.data import cache as data_cache
from distsft.data import mixture
from distsft.errors import SpecError
from distsft.config.spec import validate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "data"
TINY = ROOT / "examples" / "tiny-llama"


def _spec(tmp_path, _seed=42, **data_kw):
    return validate({"model": {"name_or_path": str(TINY)},
                     "data": {"max_length": 256, "cache_dir": str(tmp_path / "cache"), **data_kw},
                     "train": {"seed": _seed}})


@pytest.fixture
def files(tmp_path):
    """The chat JSONL, the instruction set as Parquet, and the chats renamed to `conversations` as CSV
    would not hold lists -- so a save_to_disk directory with a renamed column."""
    from datasets import Dataset
    inst = list({json.dumps(r, sort_keys=True): r for r in (json.loads(line) for line in
                 (EXAMPLES / "instruct.jsonl").read_text().splitlines() if line.strip())}.values())
    Dataset.from_list(inst).to_parquet(str(tmp_path / "instruct.parquet"))
    chats = [json.loads(line) for line in (EXAMPLES / "eval.jsonl").read_text().splitlines() if line.strip()]
    by_conv = {json.dumps(json.loads(line)["messages"]): line
               for line in (EXAMPLES / "train.jsonl").read_text().splitlines() if line.strip()}
    unique = list(by_conv.values())
    (tmp_path / "chat.jsonl").write_text("\n".join(unique) + "\n")  # the example chats hold a few duplicates
    Dataset.from_list([{"conversations": c["messages"]} for c in chats]).save_to_disk(str(tmp_path / "renamed"))
    return {"chat": str(tmp_path / "chat.jsonl"), "n_chat": len(unique), "n_inst": len(inst), "inst": str(tmp_path / "instruct.parquet"),
            "renamed": str(tmp_path / "renamed"), "eval": str(EXAMPLES / "eval.jsonl")}


def _unpacked(ds):
    """The multiset of examples in packed rows, as sorted tuples of token ids."""
    out = []
    for ids, lens in zip(ds["input_ids"], ds["seq_lengths"]):
        p = 0
        for n in lens:
            out.append(tuple(ids[p:p + n]))
            p += n
    return sorted(out)


def test_mixture_of_formats_fractions_and_counts(tiny_tokenizer, tmp_path, files):
    spec = _spec(tmp_path, sources=[
        {"path": files["chat"], "fraction": 0.25},
        {"path": files["inst"], "format": "instruction", "count": 250},   # < 100 records: each 2 or 3 times
        {"path": files["renamed"], "columns": {"messages": "conversations"}, "fraction": 2.0}])
    ds, stats = data.load_or_build(spec, tiny_tokenizer, "train", data_cache.default_cache_root(spec))
    quarter = round(files["n_chat"] / 4)
    assert [s["examples"] for s in stats["sources"]] == [quarter, 250, 400]
    assert [s["path"] for s in stats["sources"]] == [files["chat"], files["inst"], files["renamed"]]
    assert stats["num_examples"] + stats["num_dropped"] == quarter + 650
    got = _unpacked(ds)
    # fraction 2: every record exactly twice (the same examples as a plain build of the source, doubled)
    once = _spec(tmp_path, sources=[{"path": files["renamed"], "columns": {"messages": "conversations"}}])
    twice = _spec(tmp_path, sources=[{"path": files["renamed"], "columns": {"messages": "conversations"},
                                      "fraction": 2.0}])
    one = _unpacked(data.build(once, tiny_tokenizer, "train", tmp_path / "once")[0])
    assert _unpacked(data.build(twice, tiny_tokenizer, "train", tmp_path / "twice")[0]) == sorted(one * 2)
    assert stats["lower_bound_rows"] <= stats["num_rows"] <= stats["lower_bound_rows"] + 3

    # deterministic from the seed, not from anything else; another seed draws other records
    again = data.build(spec, tiny_tokenizer, "train", tmp_path / "again")[0]
    assert again[:] == ds[:]
    other = _spec(tmp_path, _seed=7, sources=[s.model_dump() for s in spec.data.sources])
    assert data_cache.cache_key(other, tiny_tokenizer, "train") != data_cache.cache_key(spec, tiny_tokenizer, "train")
    assert _unpacked(data.build(other, tiny_tokenizer, "train", tmp_path / "seed7")[0]) != got


def test_selection_is_exact_and_seeded():
    src = mixture.Source("data.sources", 0, mixture.SourceSpec(path="x", count=25))
    m = mixture.select(10, src, 42, "train")
    assert m.sum() == 25 and set(m.tolist()) == {2, 3}
    assert (mixture.select(10, src, 42, "train") == m).all()
    few = mixture.select(1000, mixture.Source("data.sources", 0, mixture.SourceSpec(path="x", fraction=0.1)), 1, "train")
    assert few.sum() == 100 and few.max() == 1
    assert mixture.select(10, mixture.Source("k", 0, mixture.SourceSpec(path="x")), 42, "train") is None


def test_val_split_and_eval_sets(tiny_tokenizer, tmp_path, files):
    spec = _spec(tmp_path, sources=[{"path": files["chat"]}, {"path": files["inst"], "format": "instruction"}],
                 val_set_size=0.1, eval_sources=[{"path": files["eval"], "label": "chat_eval"},
                                                 {"path": files["inst"], "format": "instruction"}])
    root = data_cache.default_cache_root(spec)
    train, tstats = data.load_or_build(spec, tiny_tokenizer, "train", root)
    ev, estats = data.load_or_build(spec, tiny_tokenizer, "eval", root)
    sets = estats["eval_sets"]
    assert [s["label"] for s in sets] == ["val", "chat_eval", "instruct"]
    n_train = files["n_chat"] + files["n_inst"]
    n_val = round(0.1 * n_train)
    assert sets[0]["examples"] == n_val and sets[1]["examples"] == 200 and sets[2]["examples"] == files["n_inst"]
    assert tstats["num_examples"] + tstats["num_dropped"] == n_train - n_val
    assert sum(s["examples"] for s in tstats["sources"]) == n_train - n_val
    # rows of a set are contiguous and never mix sets
    assert sets[0]["rows"][0] == 0 and sets[-1]["rows"][1] == len(ev) == estats["num_rows"]
    assert all(a["rows"][1] == b["rows"][0] for a, b in zip(sets, sets[1:]))
    # a count, and the job's split of the eval cache into sets
    from distsft.data.split import eval_sets
    parts = eval_sets(ev, estats)
    assert list(parts) == ["val", "chat_eval", "instruct"] and sum(len(p) for p in parts.values()) == len(ev)
    # a count; held out whole: no validation example is trained on (the fixture's chats are distinct)
    spec2 = _spec(tmp_path, sources=[{"path": files["chat"], "fraction": 1.5}], val_set_size=37)
    ev2, st2 = data.build(spec2, tiny_tokenizer, "eval", tmp_path / "c2")
    tr2 = _unpacked(data.build(spec2, tiny_tokenizer, "train", tmp_path / "c2")[0])
    val = set(_unpacked(ev2))
    assert st2["eval_sets"][0]["examples"] == len(val) == 37 and not val & set(tr2)
    # every copy of a held-out record leaves the training mixture (1 or 2 copies at fraction 1.5)
    assert len(tr2) + 37 <= round(1.5 * files["n_chat"]) <= len(tr2) + 2 * 37


def test_num_proc_gives_identical_caches(tiny_tokenizer, tmp_path, files):
    base = dict(sources=[{"path": files["chat"], "fraction": 0.6},
                         {"path": files["inst"], "format": "instruction", "count": 130}], max_length=128)
    builds = {}
    for n in (1, 2, 3):
        spec = _spec(tmp_path, num_proc=n, **base)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys.modules["distsft.data.build"], "_CHUNK", 97)  # many chunks, a short last one
            ds, stats = data.build(spec, tiny_tokenizer, "train", tmp_path / f"np{n}")
        builds[n] = (ds[:], stats)
    assert builds[1] == builds[2] == builds[3]
    assert data_cache.cache_key(_spec(tmp_path, num_proc=1, **base), tiny_tokenizer, "train") == \
        data_cache.cache_key(_spec(tmp_path, num_proc=3, **base), tiny_tokenizer, "train")


def test_csv_and_data_dir_splits(tiny_tokenizer, tmp_path, files):
    """CSV instruction data; a folder of split files read by `datasets` by split (the offline stand-in
    for a hub dataset): an eval source loads its own split, never the training one."""
    from datasets import Dataset
    inst = [json.loads(line) for line in (EXAMPLES / "instruct.jsonl").read_text().splitlines() if line.strip()]
    Dataset.from_list(inst).to_csv(str(tmp_path / "inst.csv"))
    folder = tmp_path / "folder"
    folder.mkdir()
    lines = (EXAMPLES / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:50]) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[50:80]) + "\n")
    spec = _spec(tmp_path, sources=[{"path": str(tmp_path / "inst.csv"), "format": "instruction"},
                                    {"path": str(folder)}],
                 eval_sources=[{"path": str(folder), "split": "test"}])
    t = data.build(spec, tiny_tokenizer, "train", tmp_path / "c")[1]
    e = data.build(spec, tiny_tokenizer, "eval", tmp_path / "c")[1]
    assert [s["examples"] for s in t["sources"]] == [len(inst), 50]
    assert e["eval_sets"] == [{"label": "folder", "examples": 30, "tokens": e["num_tokens"], "rows": [0, e["num_rows"]]}]


@pytest.mark.parametrize("entry,words", [
    ({"path": "nope.jsonl"}, r"data.sources\[1\] \(nope.jsonl\): data file not found"),
    ({"path": "{inst}"}, r"data.sources\[1\] \(.*instruct.parquet\): no column 'messages'; columns are"),
    ({"path": "{inst}", "format": "instruction", "columns": {"output": "answer"}},
     r"data.sources\[1\] \(.*instruct.parquet\): no column 'answer'"),
    ({"path": "{chat}", "columns": {"messages": "conversations"}},
     r"chat.jsonl:1: no column 'conversations' \(data.sources\[1\] \(.*chat.jsonl\): columns maps"),
    ({"path": "{chat}", "split": "test"}, r"data.sources\[1\] \(.*chat.jsonl\): split 'test'"),
    ({"path": "{chat}", "subset": "en"}, r"data.sources\[1\] \(.*chat.jsonl\): subset 'en'"),
    ({"path": "{renamed}", "split": "test"}, r"data.sources\[1\] \(.*renamed\): split 'test'"),
    ({"path": "{chat}", "fraction": 0.0001}, r"data.sources\[1\] \(.*chat.jsonl\): fraction 0.0001 .* selects no"),
])
def test_bad_sources_name_source_and_key(tiny_tokenizer, tmp_path, files, entry, words):
    entry = {k: (v.format(**files) if isinstance(v, str) else v) for k, v in entry.items()}
    spec = _spec(tmp_path, sources=[{"path": files["chat"]}, entry])
    with pytest.raises(SpecError, match=words):
        data.build(spec, tiny_tokenizer, "train", tmp_path / "c")


def test_hub_split_and_offline(tmp_path, monkeypatch, tiny_tokenizer):
    calls = []

    def load_dataset(name, subset=None, split=None, revision=None):
        calls.append((name, subset, split, revision))
        if split == "nosuch":
            raise ValueError('Unknown split "nosuch". Should be one of [\'train\', \'test\'].')
        raise ConnectionError("Couldn't reach 'org/chats' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    spec = _spec(tmp_path, sources=[{"path": str(EXAMPLES / "train.jsonl")}],
                 eval_sources=[{"path": "org/chats", "split": "nosuch", "subset": "en", "revision": "v1"}])
    with pytest.raises(SpecError, match=r"data.eval_sources\[0\] \(org/chats\): split 'nosuch' not found"):
        data.build(spec, tiny_tokenizer, "eval", tmp_path / "c")
    assert calls == [("org/chats", "en", "nosuch", "v1")]  # its own split, subset and revision
    spec = _spec(tmp_path, sources=[{"path": "org/chats"}])
    with pytest.raises(SpecError, match=r"data.sources\[0\] \(org/chats\): not a local path.*Hub.*offline"):
        data.build(spec, tiny_tokenizer, "train", tmp_path / "c")


@pytest.mark.parametrize("data_kw,words", [
    ({"train_files": ["a.jsonl"], "sources": [{"path": "b.jsonl"}]}, "data.train_files or data.sources, not both"),
    ({"sources": [{"path": "b", "fraction": 0}]}, r"data.sources.0: source 'b': fraction must be > 0"),
    ({"sources": [{"path": "b", "fraction": -1}]}, "fraction must be > 0"),
    ({"sources": [{"path": "b", "count": 0}]}, r"data.sources.0: source 'b': count must be >= 1"),
    ({"sources": [{"path": "b", "count": 3, "fraction": 0.5}]}, "fraction or count, not both"),
    ({"sources": [{"path": "b", "format": "yaml"}]}, r"data.sources\[0\] \(b\): format 'yaml'"),
    ({"sources": [{"path": "b"}], "val_set_size": 1.5}, "val_set_size must be a fraction"),
    ({"train_files": ["a"], "eval_files": ["e"], "eval_sources": [{"path": "e"}]}, "data.eval_files or data.eval_sources"),
    ({}, "set data.train_files or data.sources"),
])
def test_spec_rejects_bad_mixtures(data_kw, words):
    with pytest.raises(SpecError, match=words):
        validate({"model": {"name_or_path": "m"}, "data": data_kw})


def test_progress_plain_lines(monkeypatch, capsys):
    import io
    from distsft.observe import progress
    monkeypatch.setattr(progress, "_SHOW_AFTER_S", 0.0)
    out = io.StringIO()
    with progress.BuildProgress(1000, "train data", stream=out) as bar:
        bar.advance(400)
        bar.advance(600)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train data: 400/1,000 examples") and "examples/s" in lines[0]
    assert lines[-1].startswith("train data: 1,000/1,000 examples")
    assert np.isfinite(bar.rate())
