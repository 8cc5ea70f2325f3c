"""`data.chat_template` without a tokenizer: what it may be, checked, and where a template comes from.

`data.chat_template` is one of
- a path to a template file (`.jinja`, or any text file holding Jinja),
- a tokenizer directory (its `chat_template.jinja`, else the `chat_template` of its
  `tokenizer_config.json`) or a `tokenizer_config.json` file,
- a name: one of the templates shipped with distsft (`NAMES`: `chatml` and the families of popular
  models, in `distsft/assets/chat_templates/`), or a named variant of the tokenizer's own templates
  (e.g. `tool_use`),
- a Jinja template itself (text with `{{` or `{%`), as transformers' `chat_template` argument takes it.
Anything else (a mistyped path, an unknown name) is a `SpecError` that says which of these was
expected: before, a name like `chatml` was used as a literal one-line "template" and failed later
with unrelated mask or length errors.

This module needs no tokenizer (the spec is checked with it at load time, and run.yaml records where
the template comes from); data/templates.py resolves the tokenizer's own templates and saves the
trained template with the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.errors import SpecError

NAMED_DIR = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"
NAMES = tuple(sorted(p.stem for p in NAMED_DIR.glob("*.jinja")))
KEY = "data.chat_template"


@dataclass(frozen=True)
class Template:
    text: str | None  # None: the tokenizer has no template (and none was set)
    origin: str       # where it came from, for messages and run.yaml

    @property
    def sha256(self) -> str:
        return hashlib.sha256((self.text or "").encode()).hexdigest()


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{KEY}: cannot read {path} ({exc})") from None


def _from_config(path: Path, variant: str | None = None) -> str:
    """The `chat_template` of a tokenizer_config.json: a string, or a list of {name, template}."""
    try:
        cfg = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise SpecError(f"{KEY}: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):  # named variants, as transformers saved them before chat_template.jinja
        t = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = t.get(variant or "default")
    if not isinstance(t, str) or not t.strip():
        raise SpecError(f"{KEY}: {path} has no chat_template; expected a tokenizer_config.json that holds one "
                        "(or point at a .jinja file)")
    return t


def _from_dir(path: Path) -> tuple[str, str]:
    jinja, cfg = path / "chat_template.jinja", path / "tokenizer_config.json"
    if jinja.is_file():
        return _read(jinja), str(jinja)
    if cfg.is_file():
        return _from_config(cfg), str(cfg)
    raise SpecError(f"{KEY}: directory {path} has neither chat_template.jinja nor tokenizer_config.json; "
                    "expected a tokenizer directory")


def looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".jinja", ".j2", ".json", ".txt")) or value.startswith(".")


def expected(value: str) -> str:
    return (f"{KEY}: {value!r} is not an existing file or directory, not one of the named templates "
            f"({', '.join(NAMES)}) and not a Jinja template; expected a path to a .jinja file, a tokenizer "
            "directory or its tokenizer_config.json, or one of those names")


def check(value: str | None) -> None:
    """What can be checked without the tokenizer (at spec load): a path exists and holds a template, a
    name is known. A bare word that is not a shipped name may still be a variant of the tokenizer's
    templates; `resolve` decides that."""
    if value is None or is_jinja(value):
        return
    p = Path(value)
    if p.exists():
        resolve_text(value)
        return
    if looks_like_path(value):
        raise SpecError(no_such_path(value))


def no_such_path(value: str) -> str:
    return (f"{KEY}: no such file or directory: {value}; expected a path to a .jinja file, a tokenizer "
            f"directory or its tokenizer_config.json, or a name ({', '.join(NAMES)})")


def check_variant(value: str | None, model: str) -> None:
    """A bare word that is not a shipped name must be a named variant of a local tokenizer's templates
    (`chat_templates/NAME.jinja`, or a {name, template} entry of tokenizer_config.json). A hub model
    not on disk is checked when its tokenizer loads."""
    if not value or is_jinja(value) or Path(value).exists() or value in NAMES or looks_like_path(value):
        return
    d = Path(model)
    if not d.is_dir():
        return
    if (d / "chat_templates" / f"{value}.jinja").is_file():
        return
    try:
        t = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        t = None
    if isinstance(t, list) and any(isinstance(x, dict) and x.get("name") == value for x in t):
        return
    raise SpecError(expected(value))


def check_spec_template(spec: Any, source: str, lines: dict, touched: set) -> None:
    """check_variant for a loaded spec, the error naming the key's YAML line (or the override)."""
    try:
        check_variant(spec.data.chat_template, spec.model.name_or_path)
    except SpecError as exc:
        key = ("data", "chat_template")
        where = (" (from a command-line override)" if key in touched
                 else f" ({source}, line {lines[key]})" if key in lines else "")
        raise SpecError(f"invalid run spec:\n  {exc}{where}") from None


def resolve_text(value: str) -> Template | None:
    """The template of a value that needs no tokenizer (path, shipped name, Jinja); None otherwise."""
    if is_jinja(value):
        return Template(value, f"{KEY} (a Jinja template given inline)")
    p = Path(value)
    if p.is_dir():
        text, where = _from_dir(p)
        return Template(text, f"{KEY}: {where}")
    if p.is_file():
        if p.name.endswith(".json"):
            return Template(_from_config(p), f"{KEY}: {p}")
        return Template(_read(p), f"{KEY}: {p}")
    if value in NAMES:
        return Template(_read(NAMED_DIR / f"{value}.jinja"), f"{KEY}: {value} (named template shipped with distsft)")
    return None


def describe(value: str | None, model: str) -> str:
    """Where the template comes from, without a tokenizer (for run.yaml and the plan)."""
    if not value:
        return f"the chat template of the tokenizer {model}"
    try:
        found = resolve_text(value)
    except SpecError:
        found = None
    if found is None:
        return f"{KEY}: {value} (a named template of the tokenizer {model})"
    return f"{found.origin} (sha256 {found.sha256[:12]})"
