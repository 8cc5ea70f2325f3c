"""Data as LLaMA-Factory and axolotl users bring it (issue 24): dataset_info.json entries, inline
formatting/columns/tags, axolotl's chat_template keys; function calls, observations, per-row system,
tools and history; text content parts; nothing ignored silently. The fixtures in tests/data/peers/ are
small files written in the peers' shapes (LLaMA-Factory's data/README.md and demo files, axolotl's
docs/dataset-formats/conversation.qmd); see tests/data/peers/README.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distsft.config.spec import validate
from distsft.data.examples import Encoder
from distsft.data.peers import join_text_parts, mapping_for
from distsft.errors import SpecError

PEERS = Path(__file__).resolve().parent / "peers"
INFO = PEERS / "dataset_info.json"
TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"


def spec(*sources: dict, **data) -> object:
    return validate({"model": {"name_or_path": str(TINY)}, "data": {"sources": list(sources), **data}})


def records(path: Path) -> list[tuple[str, dict]]:
    if path.suffix == ".jsonl":
        return [(f"{path}:{i + 1}", json.loads(line)) for i, line in enumerate(path.read_text().splitlines())]
    return [(f"{path}[row {i}]", r) for i, r in enumerate(json.loads(path.read_text()))]


def convert(s, path: Path) -> tuple[list[dict], set[str]]:
    src = s.data.sources[0]
    m = mapping_for(src, s.data, "data.sources[0]")
    warnings: set[str] = set()
    return [m.convert(r, w, warnings) for w, r in records(path)], warnings


def loss_text(tok, enc) -> str:
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    return tok.decode([i for i, lab in zip(ids, labels) if lab != -100])


# ----------------------------------------------------------------------------- LLaMA-Factory


def test_dataset_info_entry_fills_the_source() -> None:
    s = spec({"dataset_info": f"{INFO}#glaive_toolcall_demo"})
    src = s.data.sources[0]
    assert src.path == str(PEERS / "glaive_toolcall_demo.json")
    assert (src.formatting, src.columns) == ("sharegpt", {"messages": "conversations", "tools": "tools"})
    hub = spec({"dataset_info": f"{INFO}#alpaca_hub"}).data.sources[0]
    assert (hub.path, hub.formatting) == ("llamafactory/alpaca_en", "alpaca")


def test_glaive_function_calls_become_tool_calls_and_observations_tool_messages() -> None:
    rows, warnings = convert(spec({"dataset_info": f"{INFO}#glaive_toolcall_demo"}), PEERS / "glaive_toolcall_demo.json")
    assert not warnings
    first = rows[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant", "tool", "assistant"]
    call = first["messages"][3]
    assert call["tool_calls"] == [{"id": "call00001", "type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]
    assert first["messages"][4]["tool_call_id"] == "call00001"
    # tools: the JSON string of bare schemas, wrapped as HF templates expect them
    assert first["tools"][0]["type"] == "function" and first["tools"][0]["function"]["name"] == "search_recipes"
    assert "tools" not in rows[1]  # "[]": no tools
    assert [m.get("tool_call_id") for m in rows[2]["messages"] if m["role"] == "tool"] == ["call00001", "call00002"]


def test_glaive_trains_on_the_calls_not_on_the_observations(tiny_tokenizer) -> None:
    s = spec({"dataset_info": f"{INFO}#glaive_toolcall_demo"}, chat_template="qwen2.5")
    enc = Encoder(tiny_tokenizer, s.data, mapping_for(s.data.sources[0], s.data, "data.sources[0]"))
    (where, rec), = records(PEERS / "glaive_toolcall_demo.json")[2:3]
    out = enc([(where, rec)])
    text = loss_text(tiny_tokenizer, out)
    assert '"name": "calculate_area"' in text and '"dimensions": [5, 3]' in text  # the call is learned
    assert "The area is 49 square units." in text
    assert '{"area": 15}' not in text  # the observation is context


def test_alpaca_system_and_history_are_used_when_mapped() -> None:
    rows, warnings = convert(spec({"dataset_info": f"{INFO}#alpaca_demo"}), PEERS / "alpaca_demo.json")
    assert not warnings
    assert rows[0]["messages"][0] == {"role": "system", "content": "You are a health coach."}
    assert [m["content"] for m in rows[1]["messages"]] == [
        "Translate to German: thank you", "Danke", "And to Spanish?", "Gracias", "Translate to French.\nGood morning",
        "Bonjour"]  # history first; prompt "\n" query as LLaMA-Factory joins them


def test_columns_the_mapping_leaves_out_warn_once() -> None:
    rows, warnings = convert(spec({"dataset_info": f"{INFO}#alpaca_defaults"}), PEERS / "alpaca_demo.json")
    assert all(m["role"] != "system" for r in rows for m in r["messages"])
    assert len(warnings) == 2  # once per column, not once per row
    for col in ("system", "history"):
        (w,) = [w for w in warnings if f"column {col!r}" in w]
        assert "data.sources[0]" in w and f"columns: {{{col}: {col}}}" in w


def test_openai_shape_with_tags_and_text_parts() -> None:
    rows, _ = convert(spec({"dataset_info": f"{INFO}#openai_demo"}), PEERS / "openai_demo.json")
    assert rows[0]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert rows[1]["messages"] == [{"role": "user", "content": "Capital of Italy?"},
                                   {"role": "assistant", "content": "Rome."}]


@pytest.mark.parametrize("entry, key, says", [
    ("mllm_demo", "columns.images", "multimodal data is not supported yet"),
    ("dpo_demo", "dataset_info", "ranking"),
    ("misnamed_column", "columns.system_message", "not a column of LLaMA-Factory's alpaca format"),
    ("no_such_entry", "dataset_info", "has no entry 'no_such_entry'; its entries are alpaca_defaults"),
])
def test_what_distsft_would_not_use_is_exit_2(entry, key, says) -> None:
    with pytest.raises(SpecError) as exc:
        spec({"dataset_info": f"{INFO}#{entry}"})
    msg = str(exc.value)
    assert re.search(r"data\.sources(\.0|\[0\])", msg) and key in msg and says in msg, msg


@pytest.mark.parametrize("source, key, says", [
    ({"path": "x.json", "formatting": "sharegpt", "columns": {"messages": "c", "system_message": "s"}},
     "columns.system_message", "expected one of messages, system, tools"),
    ({"path": "x.json", "formatting": "sharegpt", "tags": {"bot_tag": "gpt"}}, "tags.bot_tag", "not a LLaMA-Factory tag"),
    ({"path": "x.json", "formatting": "pairwise"}, "formatting", "not one of sharegpt, alpaca"),
    ({"path": "x.json", "field_messages": "c", "message_property_mappings": {"weight": "w"}},
     "message_property_mappings.weight", "does not use a message property 'weight'"),
    ({"path": "x.json", "roles": {"bot": ["gpt"]}}, "roles.bot", "not a role distsft knows"),
    ({"path": "x.json", "format": "sharegpt", "formatting": "sharegpt"}, "format", "drop format"),
    ({"path": "x.json", "format": "messages", "columns": {"system_message": "system"}},
     "columns.system_message", "not a column data.format messages reads"),
])
def test_inline_descriptions_name_the_key(source, key, says) -> None:
    with pytest.raises(SpecError) as exc:
        spec(source)
    msg = str(exc.value)
    assert re.search(r"data\.sources(\.0|\[0\])", msg) and key in msg and says in msg, msg


# ----------------------------------------------------------------------------- axolotl


def test_axolotl_roles_and_property_mappings() -> None:
    s = spec({"path": str(PEERS / "axolotl_chat.jsonl"), "field_messages": "conversations",
              "message_property_mappings": {"role": "from", "content": "value"},
              "roles": {"assistant": ["gpt", "model"], "user": ["human"], "system": ["system"]}})
    rows, _ = convert(s, PEERS / "axolotl_chat.jsonl")
    assert rows[0]["messages"] == [{"role": "system", "content": "You are a friendly assistant."},  # per-row system
                                   {"role": "user", "content": "Hello"},
                                   {"role": "assistant", "content": "Hi there! How can I help?"}]
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant", "user", "assistant"]


def test_axolotl_thinking_mapping_reaches_the_template() -> None:
    s = spec({"path": str(PEERS / "axolotl_thinking.jsonl"),
              "message_property_mappings": {"role": "role", "content": "content", "reasoning_content": "thought"}})
    rows, _ = convert(s, PEERS / "axolotl_thinking.jsonl")
    assert rows[0]["messages"][1] == {"role": "assistant", "content": "21.", "reasoning_content": "3 sevens are 21."}


# ----------------------------------------------------------------------------- rows


def test_unknown_and_malformed_roles_name_the_row_literally() -> None:
    s = spec({"path": "x.jsonl", "format": "sharegpt"})
    m = mapping_for(s.data.sources[0], s.data, "data.sources[0]")
    (where, rec), = records(PEERS / "markup_role.jsonl")
    with pytest.raises(SpecError, match=r"markup_role.jsonl:1: turn 1 has from='\[/INST\]'"):
        m.convert(rec, where)
    with pytest.raises(SpecError, match=r"x\[row 7\]: turn 0 has a malformed role from=\['human'\]"):
        m.convert({"conversations": [{"from": ["human"], "value": "hi"}]}, "x[row 7]")


def test_text_parts_join_and_other_parts_are_refused_naming_the_row() -> None:
    assert join_text_parts([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "w", 0) == "ab"
    assert join_text_parts("plain", "w", 0) == "plain"
    (_, ok), (where, bad) = records(PEERS / "image_parts.jsonl")
    with pytest.raises(SpecError) as exc:
        join_text_parts(bad["messages"][0]["content"], where, 0)
    assert str(exc.value).startswith(f"{where}: message 0: content part 0 is 'image'")
    assert "multimodal data is not supported yet" in str(exc.value)


def test_multimodal_rows_are_refused_in_every_format(tiny_tokenizer) -> None:
    (where, rec), = records(PEERS / "mllm_demo.json")
    s = spec({"path": "x.json"})
    with pytest.raises(SpecError, match=r"mllm_demo.json\[row 0\]: the row has 'images': multimodal data is not"):
        Encoder(tiny_tokenizer, s.data)([(where, rec)])
    (_, ok), (where, bad) = records(PEERS / "image_parts.jsonl")
    with pytest.raises(SpecError, match=r"image_parts.jsonl:2: message 0: content part 0 is 'image'"):
        Encoder(tiny_tokenizer, s.data)([(where, bad)])


def test_a_mapped_column_the_row_lacks_is_exit_2_naming_row_and_key() -> None:
    s = spec({"path": "x.json", "formatting": "alpaca", "columns": {"prompt": "instruction", "response": "output",
                                                                    "system": "system_prompt"}})
    m = mapping_for(s.data.sources[0], s.data, "data.sources[0] (x.json)")
    (where, rec), = records(PEERS / "alpaca_demo.json")[:1]
    with pytest.raises(SpecError) as exc:
        m.convert(rec, where)
    assert str(exc.value).startswith(f"{where}: no column 'system_prompt', which the description maps "
                                     "(data.sources[0] (x.json), LLaMA-Factory alpaca)")


def test_native_sharegpt_reads_function_calls_and_row_system_too() -> None:
    s = spec({"path": "x.json", "format": "sharegpt"})
    m = mapping_for(s.data.sources[0], s.data, "data.sources[0]")
    (where, rec), = records(PEERS / "glaive_toolcall_demo.json")[:1]
    out = m.convert({**rec, "system": "Be helpful."}, where)
    assert out["messages"][0] == {"role": "system", "content": "Be helpful."}
    assert out["messages"][4]["tool_calls"][0]["function"]["name"] == "search_recipes"
    assert out["tools"][0]["function"]["name"] == "search_recipes"


@pytest.mark.parametrize("template", ["qwen2.5", "qwen3", "llama-3.1", "llama-3.2", "mistral-v0.3"])
def test_glaive_renders_on_every_tool_template_family(template, tiny_tokenizer) -> None:
    """The shipped templates that render tools: each call is learned, each observation is context
    (Mistral-v0.3 needs the 9-character tool call ids the conversion gives)."""
    s = spec({"dataset_info": f"{INFO}#glaive_toolcall_demo"}, chat_template=template)
    enc = Encoder(tiny_tokenizer, s.data, mapping_for(s.data.sources[0], s.data, "data.sources[0]"))
    for where, rec in records(PEERS / "glaive_toolcall_demo.json")[2:3]:
        text = loss_text(tiny_tokenizer, enc([(where, rec)]))
        assert text.count("calculate_area") == 2 and '{"area": 15}' not in text, template
        assert "The area is 49 square units." in text


def test_consecutive_function_calls_are_one_parallel_call() -> None:
    s = spec({"path": "x.json", "formatting": "sharegpt"})
    m = mapping_for(s.data.sources[0], s.data, "data.sources[0]")
    call = lambda city: json.dumps({"name": "weather", "arguments": json.dumps({"city": city})})  # noqa: E731
    out = m.convert({"conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {"from": "function_call", "value": call("Paris")}, {"from": "function_call", "value": call("Rome")},
        {"from": "observation", "value": "sunny"}, {"from": "observation", "value": "rainy"},
        {"from": "gpt", "value": "Paris is sunny, Rome rainy."}]}, "x[row 0]")
    msgs = out["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["function"]["arguments"] for c in msgs[1]["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
    assert [msgs[2]["tool_call_id"], msgs[3]["tool_call_id"]] == ["call00001", "call00002"]
    with pytest.raises(SpecError, match=r"x\[row 1\]: turn 1 \(a function call\) is a string but not valid JSON"):
        m.convert({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "weather()"}]},
                  "x[row 1]")
