import json
import re
from pathlib import Path

import numpy as np
import pytest

from distsft.data import build as data
import inmemory
from distsft.data import formats
from distsft.data import cache as data_cache
from distsft.config.sections import DataSpec
from distsft.errors import SpecError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TRL_TEMPLATES = None
try:
    import trl
    TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
except ImportError:  # pragma: no cover
    pass

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content']"
          " + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
          "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}"
          "\n{% endfor %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Uppercase: kalo"}, {"role": "assistant", "content": "KALO is the answer."},
        {"role": "user", "content": "And reverse it?"}, {"role": "assistant", "content": "olak"}]


def _tokenizer(base, template, bos=None, eos=None, bos_postprocessor=False):
    """The tiny tokenizer with a foreign template and its special tokens registered."""
    tok = base
    found = set(re.findall(r"<\|[a-z_]+\|>|\[/?INST\]|</?s>", template)) | {t for t in (bos, eos) if t}
    tok.add_special_tokens({"additional_special_tokens": sorted(found)})
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    tok.chat_template = template
    if bos_postprocessor:
        from tokenizers.processors import TemplateProcessing
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def _labelled_runs(tok, ids, labels):
    """Decoded runs of consecutive tokens that carry a label."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def _tokenize_one(tok, conv, **spec_kw):
    from datasets import Dataset
    spec = DataSpec(train_files=["x"], **{"max_length": 512, **spec_kw})
    ds, stats = inmemory.tokenize(Dataset.from_dict({"messages": [conv]}), tok, spec)
    return ds[0]["input_ids"], ds[0]["labels"], stats


@pytest.mark.parametrize("template,kw,conv,expected", [
    (CHATML, {}, CONV, ["KALO is the answer.<|im_end|>\n", "olak<|im_end|>\n"]),
    (LLAMA3, {"bos": "<|begin_of_text|>", "bos_postprocessor": True}, CONV,
     ["KALO is the answer.<|eot_id|>", "olak<|eot_id|>"]),
    # No BOS in the template, but the tokenizer adds one: prepended once.
    (ZEPHYR, {"bos": "<s>", "eos": "</s>", "bos_postprocessor": True}, CONV,
     ["KALO is the answer.</s>\n", "olak</s>\n"]),
    (MISTRAL, {"bos": "<s>", "eos": "</s>"}, CONV[1:], ["KALO is the answer.</s>", "olak</s>"]),
])
def test_every_assistant_turn_and_its_end_of_turn_carry_labels(tiny_tokenizer, template, kw, conv, expected):
    tok = _tokenizer(tiny_tokenizer, template, **kw)
    ids, labels, stats = _tokenize_one(tok, conv)
    assert _labelled_runs(tok, ids, labels) == expected
    # The tokens are exactly what apply_chat_template gives (one BOS, even when both the template
    # and the tokenizer's post-processor would add one; prepended when only the tokenizer would).
    ref = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    if kw.get("bos_postprocessor") and not ref[:1] == [tok.bos_token_id]:
        ref = [tok.bos_token_id] + ref
    assert ids == ref
    assert ids.count(tok.bos_token_id) == (1 if tok.bos_token_id in ref else 0)
    assert stats["num_loss_tokens"] == sum(lab != -100 for lab in labels)


@pytest.mark.skipif(TRL_TEMPLATES is None, reason="needs trl's bundled templates")
@pytest.mark.parametrize("name,expected", [
    ("qwen2_5", ["KALO is the answer.<|im_end|>\n", "olak<|im_end|>\n"]),
    # Qwen3 renders the empty think block only for the last turn: found by the content-search fallback.
    ("qwen3", ["KALO is the answer.<|im_end|>\n", "<think>\n\n</think>\n\nolak<|im_end|>\n"]),
    ("llama3_1", ["KALO is the answer.<|eot_id|>", "olak<|eot_id|>"]),
    ("gemma3", ["KALO is the answer.<end_of_turn>\n", "olak<end_of_turn>\n"]),
    # The eos Phi-3 writes after the last message only belongs to no turn: never labelled (issue 25).
    ("phi3", ["KALO is the answer.<|end|>\n", "olak<|end|>\n"]),
    # gpt-oss ends a non-final turn with <|end|> and the final one with <|return|>.
    ("gptoss", ["<|channel|>final<|message|>KALO is the answer.<|end|>",
                "<|channel|>final<|message|>olak<|return|>"]),
])
def test_real_templates(tiny_tokenizer, name, expected):
    template = (TRL_TEMPLATES / f"{name}.jinja").read_text()
    tok = tiny_tokenizer
    found = set(re.findall(r"<[|][a-z_]+[|]>|<(?:start|end)_of_turn>", template))
    tok.add_special_tokens({"additional_special_tokens": sorted(found)})
    conv = CONV[1:] if name == "gemma3" else CONV
    ids, labels, _ = _tokenize_one(tok, conv, chat_template=template)
    assert _labelled_runs(tok, ids, labels) == expected
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=False, chat_template=template)


def test_zero_width_whitespace_tokens_of_trimmed_offsets_are_labelled(tiny_tokenizer):
    from tokenizers import processors
    tok = tiny_tokenizer
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)  # GPT-2 style
    conv = [{"role": "user", "content": "a   b"}, {"role": "assistant", "content": "KALO  is   x"}]
    ids, labels, _ = _tokenize_one(tok, conv)
    assert _labelled_runs(tok, ids, labels) == ["KALO  is   x<|im_end|>\n"]


def test_template_errors_name_the_row(tiny_tokenizer, tmp_path):
    tok = _tokenizer(tiny_tokenizer, MISTRAL, bos="<s>", eos="</s>")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n")
    spec = DataSpec(train_files=[str(f)])
    with pytest.raises(SpecError, match=rf"{f}:1: the chat template failed.*roles must alternate"):
        inmemory.tokenize(inmemory.load_records([str(f)], "messages", spec), tok, spec)
    tok.chat_template = None
    with pytest.raises(SpecError, match="has no chat template; set data.chat_template"):
        inmemory.tokenize(inmemory.load_records([str(f)], "messages", spec), tok, spec)


def test_instruction_format_and_system_prompt(tiny_tokenizer):
    spec = DataSpec(train_files=["x"], format="instruction", system_prompt="Be exact.")
    ds = inmemory.load_records([str(EXAMPLES / "instruct.jsonl")], "instruction", spec)
    rows = [json.loads(line) for line in (EXAMPLES / "instruct.jsonl").open()]
    for row, msgs in zip(rows, ds["messages"]):
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        assert msgs == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": user},
                        {"role": "assistant", "content": row["output"]}]
    tok_ds, _ = inmemory.tokenize(ds, tiny_tokenizer, spec)
    assert _labelled_runs(tiny_tokenizer, tok_ds[0]["input_ids"], tok_ds[0]["labels"]) == [
        rows[0]["output"] + "<|im_end|>\n"]
    # A conversation that has its own system message keeps it.
    spec = DataSpec(train_files=["x"], system_prompt="Be exact.")
    msgs = formats.chat_messages({"messages": CONV}, "here", spec)
    assert msgs == CONV


def _write(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(path)


def test_overlong_truncate_and_drop_counts(tiny_tokenizer, tmp_path):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]
    long_prompt = [{"role": "user", "content": "ka " * 60}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "lo " * 60}]
    f = _write(tmp_path / "d.jsonl", [short, long_prompt, long_answer])
    for overlong, kept, dropped, truncated in [("truncate", 2, 1, 1), ("drop", 1, 2, 0)]:
        spec = DataSpec(train_files=[f], max_length=32, overlong=overlong, packing=False)
        ds, stats = inmemory.tokenize(inmemory.load_records([f], "messages", spec), tiny_tokenizer, spec)
        assert (stats["num_examples"], stats["num_dropped"], stats["num_truncated"]) == (kept, dropped, truncated)
        assert max(ds["length"]) <= 32 and all(any(x != -100 for x in lab) for lab in ds["labels"])


def test_prepare_packs_caches_and_keys(tiny_tokenizer, tmp_path, monkeypatch):
    f = tmp_path / "train.jsonl"
    f.write_text((EXAMPLES / "train.jsonl").read_text())
    spec = DataSpec(train_files=[str(f)], max_length=128, max_train_examples=300)
    root = tmp_path / "cache"
    ds, stats = data.load_or_build(spec, tiny_tokenizer, "train", root)
    key = data_cache.cache_key(spec, tiny_tokenizer, "train")
    assert sorted(p.name for p in root.iterdir()) == [key]  # no temporary directory left behind
    assert ds.column_names == ["input_ids", "labels", "seq_lengths", "source_ids"]
    for row in ds:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= 128
        assert row["source_ids"] == [0] * len(row["seq_lengths"])  # one source
        starts = np.cumsum([0] + row["seq_lengths"][:-1])
        assert all(row["labels"][s] == -100 for s in starts)
    assert stats["num_examples"] + stats["num_dropped"] == 300 and stats["num_rows"] == len(ds)
    assert stats["num_tokens"] == sum(len(r) for r in ds["input_ids"])
    assert stats["lower_bound_rows"] <= stats["num_rows"] <= stats["lower_bound_rows"] + 3
    assert stats["packing_efficiency"] == round(stats["num_tokens"] / (len(ds) * 128), 6)
    assert set(stats) >= {"num_examples", "num_dropped", "num_truncated", "num_tokens", "num_loss_tokens",
                          "num_rows", "packing_efficiency", "lower_bound_rows", "length_histogram"}
    assert len(stats["length_histogram"]["counts"]) == 50
    json.dumps(stats)

    monkeypatch.setattr(data, "build", lambda *a, **k: pytest.fail("cache miss"))
    again, stats2 = data.load_or_build(spec, tiny_tokenizer, "train", root)
    assert again[:] == ds[:] and stats2 == stats
    monkeypatch.undo()
    other, _ = data.build(spec, tiny_tokenizer, "train", tmp_path / "other")
    assert other[:] == ds[:]  # deterministic row order

    keys = {key,
            data_cache.cache_key(spec.model_copy(update={"max_length": 256}), tiny_tokenizer, "train"),
            data_cache.cache_key(spec.model_copy(update={"chat_template": CHATML}), tiny_tokenizer, "train"),
            data_cache.cache_key(spec.model_copy(update={"packing": False}), tiny_tokenizer, "train")}
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    keys.add(data_cache.cache_key(spec, tiny_tokenizer, "train"))
    f.write_text((EXAMPLES / "eval.jsonl").read_text())
    keys.add(data_cache.cache_key(spec, tiny_tokenizer, "train"))
    assert len(keys) == 6


def test_packing_off_one_example_per_row(tiny_tokenizer, tmp_path):
    spec = DataSpec(train_files=[str(EXAMPLES / "eval.jsonl")], max_length=128, packing=False)
    ds, stats = data.load_or_build(spec, tiny_tokenizer, "train", tmp_path)
    assert len(ds) == stats["num_examples"] == stats["num_rows"]
    assert all(len(s) == 1 for s in ds["seq_lengths"])


def test_other_file_types(tiny_tokenizer, tmp_path):
    from datasets import Dataset, DatasetDict
    rows = [{"messages": CONV[1:3]}, {"messages": CONV[3:]}]
    spec = DataSpec(train_files=["x"])
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    for name in ("a.json", "lines.json", "a.parquet", "disk", "dict"):
        ds = inmemory.load_records([str(tmp_path / name)], "messages", spec)
        assert ds["messages"] == [r["messages"] for r in rows], name


@pytest.mark.parametrize("content,fmt,words", [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [\n',
     "messages", r"d.jsonl:2: not valid JSON"),
    ('{"conversation": []}\n', "messages", r"d.jsonl:1: missing column 'messages'"),
    ('{"instruction": "a", "output": "b"}\n', "messages", r"missing column 'messages'.*set data.format: instruction"),
    ('{"instruction": "a", "answer": "b"}\n', "instruction", r"d.jsonl:1: missing column 'output'"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "messages", r"d.jsonl:1: conversation has no assistant"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}\n', "messages",
     r"d.jsonl:1: message 1 is an empty assistant turn"),
    ('{"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]}\n', "messages",
     r"d.jsonl:1: message 0 has role 'human'"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}\n', "messages",
     r"d.jsonl:1: message 0 \(user\) content must be a string"),
    ('[1, 2]\n', "messages", r"d.jsonl:1: expected a JSON object"),
    ('{"instruction": "a", "input": "", "output": ""}\n', "instruction", r"d.jsonl:1: empty 'output'"),
])
def test_bad_input_gives_one_clear_spec_error(tmp_path, content, fmt, words):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(SpecError, match=words):
        inmemory.load_records([str(f)], fmt, DataSpec(train_files=[str(f)], format=fmt))


def test_missing_files_and_hub_ids(tmp_path, monkeypatch):
    spec = DataSpec(train_files=["x"])
    with pytest.raises(SpecError, match="data file not found: .*nope.jsonl"):
        inmemory.load_records([str(tmp_path / "nope.jsonl")], "messages", spec)
    (tmp_path / "t.txt").write_text("a,b\n")
    with pytest.raises(SpecError, match="unsupported file type .txt"):
        inmemory.load_records([str(tmp_path / "t.txt")], "messages", spec)
    from datasets import Dataset
    Dataset.from_list([{"text": "a"}]).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(SpecError, match=r"p.parquet: no column 'messages'; columns are \['text'\]"):
        inmemory.load_records([str(tmp_path / "p.parquet")], "messages", spec)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")
    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(SpecError, match="someone/chats.*not a local path.*Hub.*Couldn't reach"):
        inmemory.load_records(["someone/chats"], "messages", spec)


def test_packed_rows_carry_each_examples_source(tiny_tokenizer, tmp_path):
    """Rows mix sources; `source_ids` (parallel to seq_lengths) names each example's data.sources index,
    so per-source losses survive packing: each source's example count comes out exactly."""
    from distsft.config.sections import DataSpec, SourceSpec
    chat, instr = EXAMPLES / "train.jsonl", EXAMPLES / "instruct.jsonl"
    spec = DataSpec(sources=[SourceSpec(path=str(chat), count=200, label="chat"),
                             SourceSpec(path=str(instr), format="instruction", label="instr")], max_length=256)
    ds, stats = data.load_or_build(spec, tiny_tokenizer, "train", tmp_path / "cache")
    per_source = {0: 0, 1: 0}
    mixed = 0
    for row in ds:
        assert len(row["source_ids"]) == len(row["seq_lengths"])
        mixed += len(set(row["source_ids"])) > 1
        for s in row["source_ids"]:
            per_source[s] += 1
    assert per_source == {0: 200, 1: stats["num_examples"] - 200} and mixed > 0
    # a changed label names metrics only: the same cache
    relabelled = spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"label": "x"}), spec.sources[1]]})
    assert data_cache.cache_key(relabelled, tiny_tokenizer, "train") == data_cache.cache_key(spec, tiny_tokenizer, "train")
