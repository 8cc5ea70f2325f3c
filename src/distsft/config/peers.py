"""Other tools' dataset descriptions as a source's keys: LLaMA-Factory's `dataset_info.json` entries
(`formatting`, `columns`, `tags`, or `dataset_info: path#name` to read the entry itself) and axolotl's
`type: chat_template` dataset keys (`field_messages`, `message_property_mappings`, `roles`).

Pure checks on names only (data/peers.py converts the records): every key a description carries must
mean something to distsft. A key distsft would not use is an error, not a silent no-op: LLaMA-Factory
ignores `columns: {system_message: system}` without a word, and the system prompts are lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# LLaMA-Factory's DatasetAttr: the columns of each formatting, and the tags of sharegpt turns.
LF_COLUMNS = {"sharegpt": ("messages", "system", "tools"),
              "alpaca": ("prompt", "query", "response", "history", "system", "tools")}
LF_DEFAULT_COLUMNS = {"sharegpt": {"messages": "conversations"},
                      "alpaca": {"prompt": "instruction", "query": "input", "response": "output"}}
LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
MULTIMODAL = ("images", "videos", "audios")
NOT_SFT = ("chosen", "rejected", "kto_tag")  # preference and KTO data
# dataset_info.json entry keys: those distsft reads, and those it refuses with a reason.
ENTRY_READ = ("file_name", "hf_hub_url", "formatting", "columns", "tags", "subset", "split", "num_samples",
              "ms_hub_url", "om_hub_url")
ENTRY_REFUSED = {"script_url": "a dataset loading script", "cloud_file_name": "an s3/gcs file",
                 "folder": "a folder of a hub dataset", "ranking": "preference data (ranking: true)"}
# axolotl: message properties distsft passes to the template, and the roles it knows.
MESSAGE_PROPERTIES = ("role", "content", "reasoning_content", "thinking", "tool_calls", "tool_call_id", "name")
ROLES = ("system", "user", "assistant", "tool")
PEER_KEYS = ("formatting", "tags", "field_messages", "message_property_mappings", "roles")


def is_lf(src: Any) -> bool:
    return src.formatting is not None or bool(src.tags)


def is_axolotl(src: Any) -> bool:
    return src.field_messages is not None or bool(src.message_property_mappings) or bool(src.roles)


def load_entry(ref: str) -> tuple[dict[str, Any], Path]:
    """The entry `name` of a dataset_info.json given as `path#name`, and the file's directory."""
    path, sep, name = ref.partition("#")
    if not sep or not path or not name:
        raise ValueError(f"dataset_info {ref!r} must be PATH#NAME: the dataset_info.json file and the name of "
                         "its entry, e.g. data/dataset_info.json#alpaca_en_demo")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"dataset_info: no such file: {p}")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"dataset_info: {p} is not a readable JSON file ({exc})") from None
    if not isinstance(info, dict) or name not in info or not isinstance(info[name], dict):
        names = ", ".join(sorted(info)[:20]) if isinstance(info, dict) else "none"
        raise ValueError(f"dataset_info: {p} has no entry {name!r}; its entries are {names}")
    return info[name], p.parent


def expand(data: dict[str, Any]) -> dict[str, Any]:
    """A source's raw keys with its dataset_info entry filled in (the source's own keys must agree)."""
    entry, base = load_entry(str(data["dataset_info"]))
    unknown = sorted(set(entry) - set(ENTRY_READ) - set(ENTRY_REFUSED))
    if unknown:
        raise ValueError(f"dataset_info entry: key {unknown[0]!r} is not a LLaMA-Factory dataset_info key distsft "
                         f"knows (it reads {', '.join(ENTRY_READ)})")
    for k, what in ENTRY_REFUSED.items():
        if entry.get(k):
            raise ValueError(f"dataset_info entry: {k}: {what} is not supported by distsft")
    if "file_name" in entry:
        where = str(base / entry["file_name"])
    elif "hf_hub_url" in entry:
        where = entry["hf_hub_url"]
    else:
        raise ValueError("dataset_info entry: has neither file_name nor hf_hub_url (distsft reads local files and "
                         "Hugging Face Hub datasets)")
    filled = {"path": where, "subset": entry.get("subset"), "split": entry.get("split"),
              "count": entry.get("num_samples"), "formatting": entry.get("formatting", "alpaca"),
              "columns": entry.get("columns") or {}, "tags": entry.get("tags") or {}}
    out = dict(data)
    for k, v in filled.items():
        if v is None or v == {}:
            continue
        mine = out.get(k)
        if mine in (None, {}) or mine == v:
            out[k] = v
        else:
            raise ValueError(f"{k} is {mine!r} here but {v!r} in the dataset_info entry; set it in one place")
    return out


def check(src: Any) -> None:
    """Every key of a source's description means something to distsft (ValueError otherwise)."""
    lf, ax = is_lf(src), is_axolotl(src)
    if lf and ax:
        raise ValueError("LLaMA-Factory keys (formatting, tags) and axolotl keys (field_messages, "
                         "message_property_mappings, roles) describe the same thing; use one of them")
    if (lf or ax) and src.format is not None:
        raise ValueError(f"format {src.format!r} and a {'LLaMA-Factory' if lf else 'axolotl'} description: the "
                         "description says how to read the data; drop format")
    if lf:
        _check_lf(src)
    elif ax:
        _check_axolotl(src)


def _check_lf(src: Any) -> None:
    fmt = src.formatting or "alpaca"
    if fmt not in LF_COLUMNS:
        raise ValueError(f"formatting {fmt!r} is not one of sharegpt, alpaca")
    for k, v in src.columns.items():
        if k in MULTIMODAL:
            raise ValueError(f"columns.{k}: multimodal data is not supported yet")
        if k in NOT_SFT:
            raise ValueError(f"columns.{k}: preference and KTO data (chosen, rejected, kto_tag) is not SFT data")
        if k not in LF_COLUMNS[fmt]:
            raise ValueError(f"columns.{k}: not a column of LLaMA-Factory's {fmt} format; expected one of "
                             f"{', '.join(LF_COLUMNS[fmt])}")
        if not isinstance(v, str) or not v:
            raise ValueError(f"columns.{k} must name a column of the data")
    if src.tags and fmt != "sharegpt":
        raise ValueError("tags apply to formatting: sharegpt only")
    for k, v in src.tags.items():
        if k not in LF_TAGS:
            raise ValueError(f"tags.{k}: not a LLaMA-Factory tag; expected one of {', '.join(LF_TAGS)}")
        if not isinstance(v, str) or not v:
            raise ValueError(f"tags.{k} must be a non-empty string")


def _check_axolotl(src: Any) -> None:
    if src.columns:
        raise ValueError("columns: with axolotl keys name the messages column with field_messages")
    for k, v in src.message_property_mappings.items():
        if k not in MESSAGE_PROPERTIES:
            raise ValueError(f"message_property_mappings.{k}: distsft does not use a message property {k!r}; "
                             f"expected one of {', '.join(MESSAGE_PROPERTIES)}")
        if not isinstance(v, str) or not v:
            raise ValueError(f"message_property_mappings.{k} must name a key of the messages")
    seen: dict[str, str] = {}
    for role, names in src.roles.items():
        if role not in ROLES:
            raise ValueError(f"roles.{role}: not a role distsft knows; expected one of {', '.join(ROLES)}")
        for n in names:
            if n in seen and seen[n] != role:
                raise ValueError(f"roles: {n!r} is listed under both {seen[n]} and {role}")
            seen[n] = role


def check_columns(d: Any, name: str, src: Any) -> None:
    """With distsft's own formats, a `columns` target the format does not read would rename a column to
    nothing: an error, not a silent no-op (`d` is the DataSpec, for the format and column names)."""
    if is_lf(src) or is_axolotl(src) or not src.columns:
        return
    fmt = src.format or d.format
    reads = {"messages": [d.messages_column, "tools", "chat_template_kwargs"],
             "sharegpt": [d.conversations_column, "system", "tools", "chat_template_kwargs"],
             "instruction": [d.instruction_column, d.input_column, d.output_column, "system", "history",
                             "chat_template_kwargs"],
             "prompt_completion": [d.prompt_column, d.completion_column, "tools", "chat_template_kwargs"],
             "text": [d.text_column]}[fmt]
    for target in src.columns:
        if target not in reads:
            raise ValueError(f"{name}: columns.{target}: not a column data.format {fmt} reads; expected one of "
                             f"{', '.join(reads)} (columns maps those names to the source's)")
