"""Records to conversations: each `data.format`'s columns become a validated list of messages.

Formats: `messages` (default: a list of {role, content, ...}), `sharegpt` (`conversations` of
{from, value}), `instruction` (instruction/input/output), `prompt_completion` (TRL's `prompt` and
`completion`, each a string or a list of messages) and `text` (one `text` column, loss on every token).
Messages may carry `reasoning_content`, `tool_calls`, `tool_call_id`, `name` and `"loss": false`;
rows may carry `tools` and `chat_template_kwargs`, passed to the template as TRL passes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distsft.data.peers import join_text_parts, mapping_for, refuse_multimodal
from distsft.errors import SpecError

ROLES = ("system", "user", "assistant", "tool")
# The names apply_chat_template itself binds; a row's chat_template_kwargs must not shadow them.
_RESERVED_KWARGS = ("messages", "tools", "documents", "add_generation_prompt")


@dataclass
class Conversation:
    """What one record renders: messages (with `loss` flags), row-level tools and template kwargs.
    `plain` is set instead for the template-free formats: (text, loss_start)."""
    messages: list[dict] = field(default_factory=list)
    tools: list | None = None
    kwargs: dict = field(default_factory=dict)
    plain: tuple[str, int] | None = None


def _hint(rec: dict, spec: Any) -> str:
    guess = [("instruction", spec.instruction_column in rec and spec.output_column in rec),
             ("messages", spec.messages_column in rec), ("sharegpt", spec.conversations_column in rec),
             ("prompt_completion", spec.prompt_column in rec and spec.completion_column in rec),
             ("text", spec.text_column in rec)]
    for fmt, ok in guess:
        if ok and fmt != spec.format:
            return f" (this looks like {fmt} data: set data.format: {fmt})"
    return ""


def _need(rec: Any, col: str, key: str, where: str, spec: Any) -> Any:
    if not isinstance(rec, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if col not in rec:
        raise SpecError(f"{where}: missing column {col!r} (data.{key}); keys are {sorted(rec)}"
                        + _hint(rec, spec))
    return rec[col]


def required_columns(spec: Any) -> list[str]:
    """The columns a tabular source must have for `data.format`."""
    return {"messages": [spec.messages_column], "sharegpt": [spec.conversations_column],
            "instruction": [spec.instruction_column, spec.output_column],
            "prompt_completion": [spec.prompt_column, spec.completion_column],
            "text": [spec.text_column]}[spec.format]


_PLAIN = {"role", "content"}


def _message(m: Any, j: int, where: str) -> dict:
    if (type(m) is dict and m.keys() == _PLAIN and type(m["content"]) is str and m["role"] in ROLES
            and (m["role"] != "assistant" or m["content"].strip())):
        return m  # the common case, valid as it is (a third of the time of the full checks)
    if not isinstance(m, dict) or "role" not in m:
        raise SpecError(f"{where}: message {j} must be an object with 'role' and 'content'")
    # As apply_chat_template does: keys whose value is None are absent (Arrow fills missing struct keys
    # with None).
    m = {k: v for k, v in m.items() if v is not None}
    role = m["role"]
    if role not in ROLES:
        raise SpecError(f"{where}: message {j} has role {role!r}; roles must be one of {', '.join(ROLES)}")
    calls = m.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)
                              or not all(isinstance(c, dict) for c in calls)):
        raise SpecError(f"{where}: message {j}: tool_calls must be a list of objects on an assistant message")
    if calls == []:
        del m["tool_calls"]
        calls = None
    content = m.get("content")
    if isinstance(content, list):  # OpenAI / LLaMA-Factory content parts: the text parts, joined
        content = m["content"] = join_text_parts(content, where, j, role)
    if content is None and not calls:
        raise SpecError(f"{where}: message {j} must be an object with 'role' and 'content'")
    if content is not None and not isinstance(content, str):
        raise SpecError(f"{where}: message {j} ({role}) content must be a string, got {type(content).__name__}")
    if "loss" in m and not isinstance(m["loss"], bool):
        raise SpecError(f"{where}: message {j}: 'loss' must be true or false, got {m['loss']!r}")
    if "loss" in m and role != "assistant":
        raise SpecError(f"{where}: message {j}: 'loss' applies to assistant messages only ({role} turns never "
                        "carry loss)")
    reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
    if reasoning is not None and not isinstance(reasoning, str):
        raise SpecError(f"{where}: message {j}: reasoning_content must be a string")
    if role == "assistant" and not (content or "").strip() and not calls and not (reasoning or "").strip():
        raise SpecError(f"{where}: message {j} is an empty assistant turn")
    if reasoning is not None:
        # transformers passes reasoning under all its names (gpt-oss templates read `thinking`).
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def _messages(raw: Any, where: str, col: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(f"{where}: {col!r} must be a non-empty list of messages")
    return [_message(m, j, where) for j, m in enumerate(raw)]


def _string(v: Any, col: str, where: str) -> str:
    if not isinstance(v, str):
        raise SpecError(f"{where}: column {col!r} must be a string, got {type(v).__name__}")
    return v


def _row_extras(rec: dict, where: str) -> tuple[list | None, dict]:
    if "tools" not in rec and "chat_template_kwargs" not in rec:
        return None, {}
    tools = rec.get("tools")
    if isinstance(tools, str):  # TRL accepts tools as a JSON string (Arrow cannot hold free-form schemas)
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise SpecError(f"{where}: 'tools' is a string but not valid JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise SpecError(f"{where}: 'tools' must be a list of JSON schemas (objects)")
    kwargs = rec.get("chat_template_kwargs") or {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            raise SpecError(f"{where}: 'chat_template_kwargs' is a string but not valid JSON") from None
    if not isinstance(kwargs, dict):
        raise SpecError(f"{where}: 'chat_template_kwargs' must be an object, e.g. {{\"enable_thinking\": false}}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if bad := [k for k in kwargs if k in _RESERVED_KWARGS]:
        raise SpecError(f"{where}: chat_template_kwargs may not set {', '.join(bad)}")
    return tools or None, kwargs


def to_conversation(rec: Any, where: str, spec: Any, eos: str | None = None, mapping: Any = None,
                    warnings: set[str] | None = None) -> Conversation:
    """One record as a Conversation; `eos` is appended to template-free text as TRL does. `mapping`
    (data/peers.py) reads a source described the LLaMA-Factory or axolotl way; distsft's own sharegpt
    and instruction formats are read by the same code."""
    if isinstance(rec, dict):
        refuse_multimodal(rec, where)
    if mapping is None and spec.format in ("sharegpt", "instruction"):
        for col, key in _native_required(spec):
            _need(rec, col, key, where, spec)  # the missing-column message with its data.format hint
        mapping = native_mapping(spec)
    if mapping is not None:
        rec = mapping.convert(rec, where, warnings)
        spec = messages_spec(spec)
    fmt = spec.format
    if fmt == "text":
        text = _string(_need(rec, spec.text_column, "text_column", where, spec), spec.text_column, where)
        if not text.strip():
            raise SpecError(f"{where}: empty {spec.text_column!r}; nothing to train on")
        if eos and not text.endswith(eos):
            text += eos
        return Conversation(plain=(text, 0))
    if fmt == "prompt_completion":
        prompt = _need(rec, spec.prompt_column, "prompt_column", where, spec)
        completion = _need(rec, spec.completion_column, "completion_column", where, spec)
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise SpecError(f"{where}: empty {spec.completion_column!r}; nothing to train on")
            # No chat template for plain strings, as TRL: prompt + completion (+ EOS), loss on the completion.
            text = prompt + completion
            if eos and not text.endswith(eos):
                text += eos
            return Conversation(plain=(text, len(prompt)))
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise SpecError(f"{where}: {spec.prompt_column!r} and {spec.completion_column!r} must both be strings "
                            "or both be lists of messages")
        head = _messages(prompt, where, spec.prompt_column)
        tail = _messages(completion, where, spec.completion_column)
        # Loss on the completion only: assistant turns of the prompt are context.
        msgs = [{**m, "loss": False} if m["role"] == "assistant" else m for m in head] + tail
        tools, kwargs = _row_extras(rec, where)
        return _finish(Conversation(msgs, tools, kwargs), where, spec)
    msgs = chat_messages(rec, where, spec)  # validates rec first
    return Conversation(msgs, *_row_extras(rec, where))


def _finish(conv: Conversation, where: str, spec: Any) -> Conversation:
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise SpecError(f"{where}: conversation has no assistant turn; nothing to train on")
    if spec.system_prompt and not any(m["role"] == "system" for m in conv.messages):
        conv.messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return conv


def _native_required(spec: Any) -> list[tuple[str, str]]:
    if spec.format == "sharegpt":
        return [(spec.conversations_column, "conversations_column")]
    return [(spec.instruction_column, "instruction_column"), (spec.output_column, "output_column")]


def native_mapping(spec: Any) -> Any:
    """distsft's sharegpt / instruction format as a data/peers.py mapping (columns already renamed)."""
    return mapping_for(None, spec, f"data.format: {spec.format}")


def messages_spec(spec: Any) -> Any:
    """The DataSpec that reads what a mapping produces: `messages` (+ `tools`, `chat_template_kwargs`)."""
    if spec.format == "messages" and spec.messages_column == "messages":
        return spec
    return spec.model_copy(update={"format": "messages", "messages_column": "messages"})


def chat_messages(rec: Any, where: str, spec: Any) -> list[dict]:
    """The validated messages of a chat-shaped record (messages, sharegpt or instruction)."""
    if spec.format in ("sharegpt", "instruction"):
        for col, key in _native_required(spec):
            _need(rec, col, key, where, spec)
        rec, spec = native_mapping(spec).convert(rec, where), messages_spec(spec)
    if spec.format in ("messages", "prompt_completion", "text"):
        msgs = _messages(_need(rec, spec.messages_column, "messages_column", where, spec), where,
                         spec.messages_column)
    else:  # pragma: no cover - the spec's Literal keeps this out
        raise SpecError(f"unknown data.format {spec.format!r}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise SpecError(f"{where}: conversation has no assistant turn; nothing to train on")
    if spec.system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": spec.system_prompt})
    return msgs
