"""The YAML side of the run spec: where each key sits (for error messages), pydantic errors turned into
one message naming the dotted key and its line, and `section.key=value` overrides."""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import ValidationError

from distsft.errors import SpecError


def line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line, for error messages."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (str(k.value),)
                index[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[path + (str(i),)] = v.start_mark.line + 1
                walk(v, path + (str(i),))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return index
    walk(root, ())
    return index


def format_errors(err: ValidationError, lines: dict[tuple[str, ...], int], source: str,
                   overridden: set[tuple[str, ...]]) -> str:
    msgs = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        # Literal/union branches add the branch name to the location; keep the user's key path.
        loc = tuple(p for p in loc if not p.startswith(("literal[", "list[", "str", "int", "bool")))
        dotted = ".".join(loc) or "(spec)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README for the keys of each section)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        where = ""
        for n in range(len(loc), 0, -1):
            if loc[:n] in overridden:
                where = " (from a command-line override)"
                break
            if loc[:n] in lines:
                where = f" ({source}, line {lines[loc[:n]]})"
                break
        if "input" in e and e["type"] not in ("missing", "extra_forbidden") and not isinstance(
                e["input"], (dict, list)):
            msg += f"; got {e['input']!r}"
        msgs.append(f"{dotted}: {msg}{where}" if dotted not in msg else f"{msg}{where}")
    return "invalid run spec:\n  " + "\n  ".join(msgs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> set[tuple[str, ...]]:
    """Apply `a.b=value` overrides in place; values are parsed as YAML and typed by the schema."""
    touched: set[tuple[str, ...]] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", key):
            raise SpecError(f"override {item!r} is not of the form section.key=value "
                            "(e.g. train.learning_rate=1e-5 or output_dir=runs/try2)")
        path = key.split(".")
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[path[-1]] = value
        touched.add(tuple(path))
    return touched
