"""Records to conversations: each data format's columns become a validated list of messages."""

from __future__ import annotations

from typing import Any

from distsft.spec import SpecError

ROLES = ("system", "user", "assistant")


def _hint(rec: dict, spec: Any) -> str:
    if spec.format == "messages" and spec.instruction_column in rec and spec.output_column in rec:
        return " (this looks like instruction data: set data.format: instruction)"
    if spec.format == "instruction" and spec.messages_column in rec:
        return " (this looks like chat data: set data.format: messages)"
    return ""


def _need(rec: Any, col: str, key: str, where: str, spec: Any) -> Any:
    if not isinstance(rec, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if col not in rec:
        raise SpecError(f"{where}: missing column {col!r} (data.{key}); keys are {sorted(rec)}"
                        + _hint(rec, spec))
    return rec[col]


def _conversation(rec: Any, where: str, spec: Any) -> list[dict]:
    if spec.format == "instruction":
        inst = _need(rec, spec.instruction_column, "instruction_column", where, spec)
        out = _need(rec, spec.output_column, "output_column", where, spec)
        inp = rec.get(spec.input_column) or ""
        for col, v in ((spec.instruction_column, inst), (spec.output_column, out), (spec.input_column, inp)):
            if not isinstance(v, str):
                raise SpecError(f"{where}: column {col!r} must be a string, got {type(v).__name__}")
        if not out.strip():
            raise SpecError(f"{where}: empty {spec.output_column!r} (the assistant turn); nothing to train on")
        user = inst + ("\n\n" + inp if inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    else:
        raw = _need(rec, spec.messages_column, "messages_column", where, spec)
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"{where}: {spec.messages_column!r} must be a non-empty list of messages")
        msgs = []
        for j, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise SpecError(f"{where}: message {j} must be an object with 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise SpecError(f"{where}: message {j} has role {role!r}; roles must be one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(content, str):
                raise SpecError(f"{where}: message {j} ({role}) content must be a string, "
                                f"got {type(content).__name__}")
            if role == "assistant" and not content.strip():
                raise SpecError(f"{where}: message {j} is an empty assistant turn")
            msgs.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in msgs):
            raise SpecError(f"{where}: conversation has no assistant turn; nothing to train on")
    if spec.system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": spec.system_prompt})
    return msgs
