"""data.format: messages, sharegpt, instruction, prompt_completion, text; configurable columns."""

from __future__ import annotations

import json

import pytest

from distsft.data import build as data
from distsft.data.examples import Encoder
from distsft.config.sections import DataSpec
from distsft.errors import SpecError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome."}]


def encode(tok, rec, **data):
    out = Encoder(tok, DataSpec(train_files=["x"], **data))([("x:1", rec)])
    return out.input_ids.tolist(), out.labels.tolist()


def loss_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])


def test_sharegpt_is_messages(tiny_tokenizer) -> None:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    rec = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]}
    assert encode(tiny_tokenizer, rec, format="sharegpt") == encode(tiny_tokenizer, {"messages": CHAT})
    # column names stay configurable
    assert encode(tiny_tokenizer, {"turns": rec["conversations"]}, format="sharegpt",
                  conversations_column="turns") == encode(tiny_tokenizer, {"messages": CHAT})
    with pytest.raises(SpecError, match=r"x:1: turn 0 has from='bot'"):
        encode(tiny_tokenizer, {"conversations": [{"from": "bot", "value": "x"}]}, format="sharegpt")


def test_prompt_completion_strings_concatenate_without_template_like_trl(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    ids, labels = encode(tok, {"prompt": "The capital of France is", "completion": " Paris."},
                         format="prompt_completion")
    # TRL: tokenizer(prompt + completion) plus EOS, loss from where the prompt's tokens end.
    want = tok("The capital of France is Paris." + tok.eos_token)["input_ids"]
    if tok.bos_token_id is not None and want[:1] != [tok.bos_token_id] and ids[:1] == [tok.bos_token_id]:
        want = [tok.bos_token_id] + want
    assert ids == want
    n_prompt = len(tok("The capital of France is")["input_ids"])
    assert all(lab == -100 for lab in labels[:n_prompt]) and labels[n_prompt:] == ids[n_prompt:]
    assert loss_text(tok, ids, labels).strip().startswith("Paris.")


def test_prompt_completion_messages_loss_on_completion_only(tiny_tokenizer) -> None:
    prompt, completion = CHAT[:4], CHAT[4:]
    ids, labels = encode(tiny_tokenizer, {"prompt": prompt, "completion": completion}, format="prompt_completion")
    ref_ids, _ = encode(tiny_tokenizer, {"messages": CHAT})
    assert ids == ref_ids
    assert loss_text(tiny_tokenizer, ids, labels) == "Rome.<|im_end|>\n"  # the prompt's assistant turn is context
    with pytest.raises(SpecError, match="must both be strings or both be lists"):
        encode(tiny_tokenizer, {"prompt": "q", "completion": completion}, format="prompt_completion")


def test_text_format_loss_on_every_token(tiny_tokenizer) -> None:
    ids, labels = encode(tiny_tokenizer, {"body": "Plain text for pre-training."}, format="text",
                         text_column="body")
    assert labels == ids and tiny_tokenizer.decode(ids).endswith(tiny_tokenizer.eos_token)
    with pytest.raises(SpecError, match=r"x:1: missing column 'text' \(data.text_column\).*data.format: messages"):
        encode(tiny_tokenizer, {"messages": CHAT}, format="text")


def test_message_fields_are_validated(tiny_tokenizer) -> None:
    bad = [({"role": "user", "content": "q", "loss": False}, "'loss' applies to assistant messages only"),
           ({"role": "assistant", "content": "a", "loss": "no"}, "'loss' must be true or false"),
           ({"role": "user", "content": "q", "tool_calls": [{}]}, "tool_calls must be a list of objects on an "
                                                                  "assistant message"),
           ({"role": "robot", "content": "q"}, "roles must be one of system, user, assistant, tool")]
    for msg, err in bad:
        with pytest.raises(SpecError, match=f"x:1: message 1.*{err}"):
            encode(tiny_tokenizer, {"messages": [{"role": "user", "content": "hi"}, msg,
                                                 {"role": "assistant", "content": "ok"}]})


def test_build_reads_the_columns_of_each_format(tmp_path, tiny_tokenizer) -> None:
    """A Parquet file with renamed prompt/completion columns goes through the build's loader."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"q": ["Say hi", "Say bye"], "ans": [" hi", " bye"]}), path)
    spec = DataSpec(train_files=[str(path)], format="prompt_completion", prompt_column="q", completion_column="ans",
                    max_length=64)
    _, stats = data.build(spec, tiny_tokenizer, "train", tmp_path / "cache")
    assert stats["num_examples"] == 2 and stats["num_loss_tokens"] > 0
    bad = spec.model_copy(update={"completion_column": "answer"})
    with pytest.raises(SpecError, match=r"no column 'answer'"):
        data.build(bad, tiny_tokenizer, "train", tmp_path / "cache")


def test_new_data_keys_change_the_cache_key(tmp_path, tiny_tokenizer) -> None:
    from distsft.data.cache import cache_key
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n")
    spec = DataSpec(train_files=[str(f)])
    keys = {cache_key(spec.model_copy(update=u), tiny_tokenizer, "train")
            for u in ({}, {"assistant_turns": "split"}, {"assistant_turns": "last"}, {"format": "sharegpt"},
                      {"text_column": "body"})}
    assert len(keys) == 5
