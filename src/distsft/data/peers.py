"""Records as other tools describe them -> distsft `messages` records.

A `ChatMapping` reads a list of turns (LLaMA-Factory's sharegpt with its tags, axolotl's
`chat_template` with `field_messages` / `message_property_mappings` / `roles`, and distsft's own
`sharegpt`); an `AlpacaMapping` reads LLaMA-Factory's alpaca (prompt, query, response, history,
system, tools) and distsft's own `instruction`. Both produce `{"messages": [...], "tools": [...]}`,
which formats.py then validates like any messages record, so every later rule (roles, empty answers,
`loss`, reasoning, content parts) applies to them as well.

What the peers do and distsft does the same way: a `function_call` turn (a JSON `{"name",
"arguments"}` object, or a list of them) becomes an assistant message with `tool_calls`; an
`observation` turn a `tool` message; a row's `system` column a system message (unless the turns open
with one); a row's `tools` (a list of schemas or its JSON string) the template's `tools`, bare
function schemas wrapped as `{"type": "function", "function": ...}` the way HF templates expect them;
alpaca `history` pairs become the turns before the prompt. Tool calls get ids (`call00001`, ...) and
the tool messages after them the matching `tool_call_id`, since some templates (Mistral's) require them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from distsft.config.peers import LF_DEFAULT_COLUMNS, LF_TAGS, MULTIMODAL, is_axolotl, is_lf
from distsft.errors import SpecError

# distsft's own sharegpt: LLaMA-Factory's default tags plus the role names other exports use.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_response": "tool", "observation": "tool",
                  "function_call": "function_call"}
AXOLOTL_ROLES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant",
                 "system": "system", "tool": "tool"}
MULTIMODAL_MSG = "multimodal data is not supported yet"


def join_text_parts(content: Any, where: str, j: int, role: str | None = None) -> Any:
    """OpenAI-style content parts (`[{"type": "text", "text": ...}, ...]`) as one string; a part that
    is not text is an error naming the row. Anything else is returned as it is (checked later)."""
    if not isinstance(content, list):
        return content
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif not isinstance(part, dict) or not isinstance(kind, str):
            who = f" ({role})" if role else ""
            raise SpecError(f"{where}: message {j}{who} content must be a string or a list of content parts "
                            f"({{\"type\": \"text\", \"text\": ...}}); part {k} is {type(part).__name__} {part!r:.60}")
        else:
            what = kind or type(part).__name__
            raise SpecError(f"{where}: message {j}: content part {k} is {what!r}, not text: {MULTIMODAL_MSG} "
                            "(only {\"type\": \"text\", \"text\": ...} parts are read)")
    return "".join(texts)


def refuse_multimodal(rec: dict, where: str) -> None:
    """A row with images, videos or audios (LLaMA-Factory's columns; `<image>` in the text) is refused:
    training on it as text would teach the placeholder tokens and drop the media without a word."""
    for col in MULTIMODAL:
        if rec.get(col) not in (None, [], ""):
            raise SpecError(f"{where}: the row has {col!r}: {MULTIMODAL_MSG}")


def _json(value: Any, where: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}: {what} is a string but not valid JSON ({exc.msg})") from None


def tools_of(value: Any, where: str, col: str) -> list | None:
    tools = _json(value, where, f"column {col!r}")
    if tools is None or tools == []:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise SpecError(f"{where}: column {col!r} must be a list of tool schemas (objects) or its JSON string")
    # A bare function schema ({"name", "description", "parameters"}, LLaMA-Factory's glaive data) is
    # wrapped as HF chat templates expect a tool: {"type": "function", "function": {...}}.
    return [{"type": "function", "function": t} if "name" in t and "function" not in t else t for t in tools]


def tool_calls_of(value: Any, where: str, j: int, first_id: int) -> list[dict]:
    """A function_call turn's content: {"name", "arguments"} or a list of them, as tool_calls."""
    calls = _json(value, where, f"turn {j} (a function call)")
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise SpecError(f"{where}: turn {j} is a function call but its content is not a JSON object "
                        "{\"name\": ..., \"arguments\": ...} or a list of them")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise SpecError(f"{where}: turn {j}: function call {k} has no \"name\"")
        args = _json(fn.get("arguments", {}), where, f"turn {j}: the arguments of {fn['name']!r}")
        out.append({"id": f"call{first_id + k:05d}", "type": "function",
                    "function": {"name": fn["name"], "arguments": {} if args is None else args}})
    return out


@dataclass(frozen=True)
class ChatMapping:
    """A list of turns -> messages. `roles`: (value of the role key, distsft role or "function_call")."""
    messages: str
    role_key: str
    content_key: str
    roles: tuple[tuple[str, str], ...]
    props: tuple[tuple[str, str], ...] = ()   # (message key distsft reads, key in the data)
    system: str | None = None                 # column with a per-row system prompt
    tools: str | None = None
    unused: tuple[str, ...] = ()              # columns a format could use that the mapping leaves out
    fix: str = "tags"                         # the keys that name the roles, for messages
    origin: str = ""
    required: tuple[str, ...] = ()            # columns the description names: every row must have them

    def convert(self, rec: Any, where: str, warnings: set[str] | None = None) -> dict:
        _check_row(self, rec, where, warnings)
        if self.messages not in rec:
            raise SpecError(f"{where}: missing column {self.messages!r} ({self.origin}); keys are {sorted(rec)}")
        turns = rec[self.messages]
        if not isinstance(turns, list) or not turns:
            raise SpecError(f"{where}: {self.messages!r} must be a non-empty list of turns")
        roles = dict(self.roles)
        msgs: list[dict] = []
        pending: list[str] = []  # ids of tool calls not yet answered
        n_calls = 0
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or self.role_key not in t:
                raise SpecError(f"{where}: turn {j} of {self.messages!r} must be an object with {self.role_key!r} "
                                f"and {self.content_key!r}")
            value = t[self.role_key]
            if not isinstance(value, str):
                raise SpecError(f"{where}: turn {j} has a malformed role {self.role_key}={value!r} (a {type(value).__name__}, "
                                "not a string)")
            role = roles.get(value)
            if role is None:
                raise SpecError(f"{where}: turn {j} has {self.role_key}={value!r}, which {self.fix} do not map to a "
                                f"role; known: {', '.join(sorted(roles))}")
            content = join_text_parts(t.get(self.content_key), where, j)
            m = {k: t[src] for k, src in self.props if src in t and t[src] is not None}
            m.update({k: v for k, v in t.items() if k not in (self.role_key, self.content_key)
                      and k not in dict(self.props).values() and k not in dict(self.props)})
            if role == "function_call":
                calls = tool_calls_of(content, where, j, n_calls + 1)
                n_calls += len(calls)
                pending += [c["id"] for c in calls]
                if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") and not msgs[-1]["content"]:
                    msgs[-1]["tool_calls"] += calls  # consecutive calls: one parallel call
                else:
                    msgs.append({**m, "role": "assistant", "content": "", "tool_calls": calls})
                continue
            msg = {**m, "role": role, "content": content}
            if role == "tool" and pending and "tool_call_id" not in msg:
                msg["tool_call_id"] = pending.pop(0)
            msgs.append(msg)
        if self.system and msgs[0]["role"] != "system":
            sys = rec.get(self.system)
            if sys is not None and not isinstance(sys, str):
                raise SpecError(f"{where}: column {self.system!r} (the system prompt) must be a string")
            if sys and sys.strip():
                msgs.insert(0, {"role": "system", "content": sys})
        return _record(rec, msgs, self.tools, where)


@dataclass(frozen=True)
class AlpacaMapping:
    """prompt (+ "\\n" + query) as the user turn, response as the assistant's, history before them."""
    prompt: str = "instruction"
    query: str | None = "input"
    response: str = "output"
    history: str | None = None
    system: str | None = None
    tools: str | None = None
    join: str = "\n"
    unused: tuple[str, ...] = ()
    origin: str = ""
    required: tuple[str, ...] = ()

    def convert(self, rec: Any, where: str, warnings: set[str] | None = None) -> dict:
        _check_row(self, rec, where, warnings)
        for col in (self.prompt, self.response):
            if col not in rec:
                raise SpecError(f"{where}: missing column {col!r} ({self.origin}); keys are {sorted(rec)}")
        parts = []
        for col in (self.prompt, self.query):
            v = rec.get(col) if col else None
            if v is not None and not isinstance(v, str):
                raise SpecError(f"{where}: column {col!r} must be a string, got {type(v).__name__}")
            if v and v.strip():
                parts.append(v)
        response = rec[self.response]
        if not isinstance(response, str):
            raise SpecError(f"{where}: column {self.response!r} must be a string, got {type(response).__name__}")
        if not response.strip():
            raise SpecError(f"{where}: empty {self.response!r} (the assistant turn); nothing to train on")
        msgs: list[dict] = []
        sys = rec.get(self.system) if self.system else None
        if sys is not None and not isinstance(sys, str):
            raise SpecError(f"{where}: column {self.system!r} (the system prompt) must be a string")
        if sys and sys.strip():
            msgs.append({"role": "system", "content": sys})
        hist = rec.get(self.history) if self.history else None
        if hist:
            if not isinstance(hist, list):
                raise SpecError(f"{where}: column {self.history!r} must be a list of [prompt, response] pairs")
            for k, pair in enumerate(hist):
                if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                    raise SpecError(f"{where}: {self.history!r} item {k} must be a [prompt, response] pair of strings")
                msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        msgs += [{"role": "user", "content": self.join.join(parts)}, {"role": "assistant", "content": response}]
        return _record(rec, msgs, self.tools, where)


def _record(rec: dict, msgs: list[dict], tools_col: str | None, where: str) -> dict:
    out: dict[str, Any] = {"messages": msgs}
    if tools_col and rec.get(tools_col) is not None:
        tools = tools_of(rec[tools_col], where, tools_col)
        if tools:
            out["tools"] = tools
    if rec.get("chat_template_kwargs") is not None:
        out["chat_template_kwargs"] = rec["chat_template_kwargs"]
    return out


def _check_row(desc: Any, rec: Any, where: str, warnings: set[str] | None) -> None:
    """What every described row must be, whatever its shape: an object, with the described columns, no
    multimodal parts; the columns it has but the description leaves out are warned about once."""
    if not isinstance(rec, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    _warn_unused(desc, rec, warnings)
    refuse_multimodal(rec, where)
    _require(desc, rec, where)


def _require(mapping: Any, rec: dict, where: str) -> None:
    for col in mapping.required:
        if col not in rec:
            raise SpecError(f"{where}: no column {col!r}, which the description maps ({mapping.origin}); keys are "
                            f"{sorted(rec)}")


def _warn_unused(mapping: Any, rec: dict, warnings: set[str] | None) -> None:
    if warnings is None or not mapping.unused:
        return
    for col in mapping.unused:
        v = rec.get(col)
        if v not in (None, "", [], "[]"):
            warnings.add(f"{mapping.origin}: the data has a column {col!r} that this format can use, but the mapping "
                         f"leaves it out, so it is not used (map it to use it: {_how(mapping, col)})")


def _how(mapping: Any, col: str) -> str:
    return f"columns: {{{col}: {col}}}"


Mapping = ChatMapping | AlpacaMapping


def mapping_for(src: Any, d: Any, name: str) -> Mapping | None:
    """The mapping a source's description asks for (LLaMA-Factory or axolotl keys), or that distsft's
    own `sharegpt` / `instruction` format is (`src` None or without such keys: `d.format`, columns
    already renamed); None: the record is read as `messages`, `prompt_completion` or `text`."""
    if src is not None and is_lf(src):
        return _lf(src, name)
    if src is not None and is_axolotl(src):
        return _axolotl(src, name)
    fmt = getattr(src, "format", None) or d.format
    if fmt == "sharegpt":
        return ChatMapping(d.conversations_column, "from", "value", tuple(SHAREGPT_ROLES.items()), system="system",
                           tools="tools", fix="data.format: sharegpt's roles", origin=name)
    if fmt == "instruction":
        return AlpacaMapping(d.instruction_column, d.input_column, d.output_column, history="history",
                             system="system", join="\n\n", origin=name)
    return None


def _lf(src: Any, name: str) -> Mapping:
    fmt = src.formatting or "alpaca"
    cols = {**LF_DEFAULT_COLUMNS[fmt], **(src.columns or {})}
    origin = f"{name}, LLaMA-Factory {fmt}"
    optional = ("system", "tools") + (("history",) if fmt == "alpaca" else ())
    unused = tuple(c for c in optional if c not in cols)
    named = tuple(v for k, v in (src.columns or {}).items())  # what the user mapped must exist
    if fmt == "alpaca":
        return AlpacaMapping(cols["prompt"], cols.get("query"), cols["response"], cols.get("history"),
                             cols.get("system"), cols.get("tools"), "\n", unused, origin,
                             tuple(c for c in named if c != cols.get("query")))
    tags = {**LF_TAGS, **(src.tags or {})}
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["observation_tag"]: "tool",
             tags["function_tag"]: "function_call", tags["system_tag"]: "system"}
    return ChatMapping(cols["messages"], tags["role_tag"], tags["content_tag"], tuple(roles.items()),
                       system=cols.get("system"), tools=cols.get("tools"), unused=unused,
                       fix="tags (user_tag, assistant_tag, observation_tag, function_tag, system_tag)", origin=origin,
                       required=named)


def _axolotl(src: Any, name: str) -> Mapping:
    props = {"role": "role", "content": "content", **(src.message_property_mappings or {})}
    roles = ({n: role for role, names in src.roles.items() for n in names} if src.roles else AXOLOTL_ROLES)
    extra = tuple((k, v) for k, v in props.items() if k not in ("role", "content"))
    return ChatMapping(src.field_messages or "messages", props["role"], props["content"], tuple(roles.items()),
                       props=extra, system="system", tools="tools", fix="roles", origin=f"{name}, axolotl chat_template")


@dataclass
class Converter:
    """A mapping applied to `(where, record)` pairs, collecting its one-time warnings."""
    mapping: Mapping
    warnings: set[str] = field(default_factory=set)

    def __call__(self, pairs: list) -> list:
        return [(where, self.mapping.convert(rec, where, self.warnings)) for where, rec in pairs]
