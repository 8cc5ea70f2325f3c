"""Chat template rendering, assistant-span location and offset-aware batch tokenization.

The loss mask is computed on characters, not on template markers: for assistant turn i, the text the
model must produce is what `render(messages[:i+1])` adds after `render(messages[:i],
add_generation_prompt=True)` -- the content plus whatever the template writes after it (<|im_end|>,
<|eot_id|>, </s>, ...), but not the generation-prompt header. That works for any template, with or
without `{% generation %}` markers. Tokens are then labelled by their character offsets.
"""

from __future__ import annotations

import hashlib
import json
import re
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from distsft.spec import SpecError


class TemplateMismatch(Exception):
    """The template rewrites an assistant message so that it cannot be found in the rendered text."""


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    """`data.chat_template` (a Jinja string or a path to a .jinja file) or the tokenizer's own template."""
    template = getattr(tokenizer, "chat_template", None)
    if override:
        if isinstance(template, dict) and override in template:  # a named variant, e.g. "tool_use"
            return template[override]
        if "{" not in override and Path(override).is_file():
            return Path(override).read_text()
        return override
    if isinstance(template, dict):  # named variants: the default one is what apply_chat_template uses
        template = template.get("default")
    if not template:
        raise SpecError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; set data.chat_template "
                        "(a Jinja template string or a path to a .jinja file)")
    return template


def _compile(template: str) -> Any:
    # transformers' own sandboxed environment (generation tag, tojson, raise_exception, strftime_now),
    # compiled once; rendering it directly skips apply_chat_template's per-call overhead (~2x).
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers layout
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False, **k)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))


class ChatRenderer:
    """Renders conversations exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does."""

    def __init__(self, tokenizer: Any, template: str):
        self.template = template
        self._compiled = _compile(template)
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) as template variables.
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        added = [t for t in (tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {})
                 if t.strip()]
        alt = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self._added = re.compile(alt) if added else None
        self._ends_added = re.compile(rf"(?:{alt})\s*\Z") if added else None
        self._next_added = re.compile(rf"\s*(?:{alt})") if added else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._kwargs)

    def _try(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        try:
            return self.render(messages, add_generation_prompt)
        except Exception:  # a template may refuse a prefix (e.g. "must end with a user turn")
            return None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        last = len(messages) - 1
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            pre = self._try(messages[:i], True)
            thru = full if i == last else self._try(messages[: i + 1], False)
            if (pre is not None and thru is not None and cursor <= len(pre) < len(thru)
                    and full.startswith(thru) and thru.startswith(pre)):
                span = (len(pre), len(thru))  # the usual, prefix-preserving case
            else:
                span = self._search_span(full, msg["content"], pre, thru, cursor, i)
            # Templates that expect list-of-parts content (VLMs) silently render nothing for a string.
            tail = msg["content"].strip()[-32:]
            if tail not in full[span[0]:span[1]]:
                raise TemplateMismatch(f"assistant message {i} does not appear in the rendered chat")
            if self._added and not self._ends_added.search(full, max(span[0], span[1] - 64), span[1]):
                # No end-of-turn token after the answer (GLM-4): the model stops by emitting the next
                # header token (<|user|>), so that token is the target to learn.
                if m := self._next_added.match(full, span[1]):
                    span = (span[0], m.end())
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _search_span(self, full: str, content: str, pre: str | None, thru: str | None, cursor: int,
                     i: int) -> tuple[int, int]:
        """Fallback for templates that render a turn differently when it is not the last one (Qwen3
        drops the empty think block, gpt-oss ends it with <|end|> instead of <|return|>): find the
        content after `cursor`, start at the generation prompt when that is still a prefix, and
        extend over the end-of-turn text the template writes after it."""
        for needle in (content, content.strip()):
            k = full.find(needle, cursor) if needle else -1
            if k >= 0:
                break
        else:
            raise TemplateMismatch(f"assistant message {i} does not appear verbatim in the rendered chat")
        start = len(pre) if pre is not None and cursor <= len(pre) <= k and full.startswith(pre) else k
        end = k + len(needle)
        n = 0
        if thru is not None and (j := thru.rfind(needle)) >= 0:
            tail = thru[j + len(needle):]  # what follows the content when this turn is the last one
            while n < len(tail) and end + n < len(full) and full[end + n] == tail[n]:
                n += 1
            for m in self._added.finditer(tail) if self._added else ():
                if m.start() < n < m.end():  # never stop inside a special token
                    n = m.start()
                    break
        if n == 0 and self._added and (m := self._added.match(full, end)):
            n = m.end() - end  # nothing in common: the turn's own end-of-turn token
        return start, end + n


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of everything that decides token ids: vocab, merges, normalizers, added/special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    h.update(json.dumps(sorted((int(k), str(v)) for k, v in added.items())).encode())
    return h.hexdigest()


class OffsetEncoder:
    """Batch tokenization returning flat numpy arrays: ids, char starts/ends and per-text lengths.

    Texts are encoded without the tokenizer's automatic special tokens (like apply_chat_template does),
    except that a BOS the tokenizer would normally add is prepended as text when the template did not
    write one -- so there is exactly one BOS either way.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
        try:
            default_ids = tokenizer("a")["input_ids"]
        except Exception:
            default_ids = []
        self.bos = bos if bos and bos_id is not None and default_ids[:1] == [bos_id] else None
        if self.backend is not None:
            # The raw Rust tokenizer is ~3x faster than the Python wrapper; use it only if it agrees.
            probe = "<probe> Hello, world!\n  2+2=4 \u00e9\u4e2d" + (tokenizer.eos_token or "")
            fast = self.backend.encode(probe, add_special_tokens=False).ids
            if fast != tokenizer(probe, add_special_tokens=False)["input_ids"]:
                self.backend = None

    def add_bos(self, text: str) -> tuple[str, int]:
        if self.bos and not text.startswith(self.bos):
            return self.bos + text, len(self.bos)
        return text, 0

    def encode(self, texts: list[str], spans: list[list[tuple[int, int]]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if self.backend is not None:
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
            ids = [e.ids for e in encs]
            offsets = [e.offsets for e in encs]
        elif getattr(self.tokenizer, "is_fast", False):
            out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = out["input_ids"], out["offset_mapping"]
        else:
            ids, offsets = self._encode_pieces(texts, spans)
        lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        total = int(lens.sum())
        # chain.from_iterable flattens in C; a generator expression here costs ~3x more.
        flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        se = np.fromiter(chain.from_iterable(chain.from_iterable(offsets)), dtype=np.int64, count=2 * total)
        return flat_ids, se[0::2], se[1::2], lens


    def _encode_pieces(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> tuple[list, list]:
        # Slow (Python) tokenizers have no offsets: tokenize the text between span boundaries piece by
        # piece and give every token its piece's range. Merges across a boundary are lost, which is
        # also how a model sees the generation-prompt / answer boundary at inference.
        all_ids, all_offsets = [], []
        for text, sp in zip(texts, spans):
            cuts = sorted({0, len(text), *(c for s in sp for c in s)})
            ids: list[int] = []
            offsets: list[tuple[int, int]] = []
            for a, b in zip(cuts, cuts[1:]):
                piece = self.tokenizer.encode(text[a:b], add_special_tokens=False)
                ids += piece
                offsets += [(a, b)] * len(piece)
            all_ids.append(ids)
            all_offsets.append(offsets)
        return all_ids, all_offsets


def label_mask(starts: np.ndarray, ends: np.ndarray, lens: np.ndarray, text_lens: np.ndarray,
               span_starts: np.ndarray, span_ends: np.ndarray, span_counts: np.ndarray) -> np.ndarray:
    """True for tokens whose characters overlap an assistant span of their own text (vectorised over
    the batch by moving every text to its own stretch of one global character axis)."""
    base = np.concatenate(([0], np.cumsum(text_lens + 1)[:-1]))
    tok_base = np.repeat(base, lens)
    gs, ge = starts + tok_base, ends + tok_base
    span_base = np.repeat(base, span_counts)
    ss, se = span_starts + span_base, span_ends + span_base
    if ss.size == 0:
        return np.zeros(gs.shape, dtype=bool)
    j = np.searchsorted(se, gs, side="right")  # first span ending after the token starts
    jc = np.minimum(j, ss.size - 1)
    # Zero-width tokens (whitespace under ByteLevel trim_offsets=True, as in GPT-2) count by position.
    return (j < ss.size) & (ss[jc] < np.maximum(ge, gs + 1))
