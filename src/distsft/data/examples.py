"""Records to tokenized examples: the per-chunk unit of the build.

`Encoder(tokenizer, spec)` is built once per process (it compiles the chat template and probes the
tokenizer); calling it on a chunk of `(where, record)` pairs converts each record to a conversation
(formats.py), renders it and locates the loss-carrying spans exactly (chat.py), tokenizes the chunk
in one batch and labels tokens by their character offsets (encode.py). The result is flat numpy
arrays, before overlong handling and packing, so the build can run it in worker processes and
concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from distsft.data.chat import ChatRenderer, chat_template_or_none, resolve_chat_template
from distsft.data.turns import TemplateMismatch
from distsft.data.drops import dropped_parts
from distsft.data.encode import OffsetEncoder, label_mask
from distsft.data.formats import Conversation, to_conversation
from distsft.data.templates import resolve as resolve_template
from distsft.errors import SpecError

REASONING_HISTORY = ("data: the chat template does not render the reasoning of earlier assistant turns, so "
                     "under data.assistant_turns: all it carries no loss; set data.assistant_turns: split to "
                     "train on it (one example per assistant turn, each rendered as the last turn)")
REASONING_NEVER = ("data: the chat template does not render the reasoning (reasoning_content or <think> "
                   "blocks) of some assistant turns even as the last turn; that reasoning carries no loss")


@dataclass
class Encoded:
    """The examples of one chunk, back to back. A record may yield several examples
    (`data.assistant_turns: split` makes one per assistant turn), so `lengths.size` is the number of
    examples, not of records."""
    input_ids: np.ndarray   # int32, all examples of the chunk back to back
    labels: np.ndarray      # int32, -100 where a token carries no loss
    lengths: np.ndarray     # int64, tokens per example
    warnings: set[str] = field(default_factory=set)  # said once per build, whatever the chunking
    wheres: list[str] = field(default_factory=list)  # each example's row, for the drops (data/drops.py)
    template_drops: dict[str, int] = field(default_factory=dict)  # records whose system / tools the template left out


@dataclass
class Rendered:
    """One example before tokenization: its text (BOS included), loss spans and the turns they are."""
    text: str
    spans: list[tuple[int, int]]
    turns: list[dict] = field(default_factory=list)  # the assistant message of each span (chat formats)


def split_think(msg: dict) -> dict:
    """`<think>...</think>` at the start of an assistant's content as `reasoning_content`, for templates
    that read reasoning from that field."""
    content = msg.get("content")
    if (msg["role"] != "assistant" or not isinstance(content, str) or "reasoning_content" in msg
            or not content.lstrip().startswith("<think>") or "</think>" not in content):
        return msg
    head, _, rest = content.partition("</think>")
    reasoning = head.lstrip()[len("<think>"):].strip("\n")
    return {**msg, "thinking": reasoning, "content": rest.lstrip("\n"), "reasoning_content": reasoning}


class Encoder:
    """`mapping` (data/peers.py) reads a source described the LLaMA-Factory or axolotl way."""

    def __init__(self, tokenizer: Any, spec: Any, mapping: Any = None):
        self.spec = spec
        self.mapping = mapping
        self.tokenizer = tokenizer
        self.enc = OffsetEncoder(tokenizer)
        template = chat_template_or_none(tokenizer, spec.chat_template)
        self.renderer = ChatRenderer(tokenizer, template) if template else None
        self.template_name = resolve_template(tokenizer, spec.chat_template).origin

    def _chat(self) -> ChatRenderer:
        if self.renderer is None:  # raises the "no chat template" SpecError
            resolve_chat_template(self.tokenizer, self.spec.chat_template)
        return self.renderer

    def units(self, conv: Conversation, where: str) -> list[tuple[list[dict], list[int]]]:
        """(messages to render, assistant turns carrying loss) for each example of the conversation."""
        msgs = conv.messages
        assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        train = [i for i in assistants if msgs[i].get("loss", True)]
        mode = self.spec.assistant_turns
        if mode == "last":
            train = [assistants[-1]] if assistants[-1] in train else []
        if not train:
            raise SpecError(f"{where}: no assistant turn carries loss (data.assistant_turns: {mode}, "
                            "and \"loss\": false on the others); nothing to train on")
        if mode == "split":
            return [(msgs[: i + 1], [i]) for i in train]
        return [(msgs, train)]

    def render(self, where: str, rec: Any, method: str = "auto", warnings: set[str] | None = None,
               left_out: dict[str, int] | None = None) -> list[Rendered]:
        """The examples of one record, before tokenization."""
        conv = to_conversation(rec, where, self.spec, eos=self.tokenizer.eos_token, mapping=self.mapping,
                               warnings=warnings)
        if conv.plain is not None:
            text, start = conv.plain
            text, shift = self.enc.add_bos(text)
            return [Rendered(text, [(start + shift, len(text))])]
        chat = self._chat()
        out = []
        for msgs, turns in self.units(conv, where):
            clean = [{k: v for k, v in m.items() if k != "loss"} if "loss" in m else m for m in msgs]
            if chat.reads_reasoning:
                clean = [split_think(m) for m in clean]
            try:
                text, spans = chat.assistant_spans(clean, conv.tools, conv.kwargs, turns, method)
            except TemplateMismatch as exc:
                raise SpecError(f"{where}: {exc} ({self.template_name}); the loss mask of this turn cannot be "
                                "located unambiguously. Set data.chat_template to a template with "
                                "{% generation %} ... {% endgeneration %} around each assistant answer") from None
            except SpecError:
                raise
            except Exception as exc:
                raise SpecError(f"{where}: the chat template failed on this conversation ({self.template_name}): "
                                f"{type(exc).__name__}: {exc}") from None
            if warnings is not None and any(sp.reasoning_dropped for sp in spans):
                # Dropped from the last turn too: the template never renders it, and split cannot help.
                never = any(sp.reasoning_dropped and sp.index == len(msgs) - 1 for sp in spans)
                warnings.add(REASONING_NEVER if never or self.spec.assistant_turns != "all" else REASONING_HISTORY)
            if left_out is not None and not out:  # once per record: what the template does not render
                for part in dropped_parts(clean, conv.tools, text, spans):
                    left_out[part] = left_out.get(part, 0) + 1
            text, shift = self.enc.add_bos(text)
            out.append(Rendered(text, [(s.start + shift, s.end + shift) for s in spans],
                                [clean[s.index] for s in spans]))
        return out

    def __call__(self, pairs: Sequence[tuple[str, Any]]) -> Encoded:
        warnings: set[str] = set()
        left_out: dict[str, int] = {}
        items, wheres = [], []
        for where, rec in pairs:
            for r in self.render(where, rec, warnings=warnings, left_out=left_out):
                items.append(r)
                wheres.append(where)
        if not items:
            empty = np.zeros(0, dtype=np.int32)
            return Encoded(empty, empty.copy(), np.zeros(0, dtype=np.int64), warnings, wheres, left_out)
        texts = [r.text for r in items]
        spans = [r.spans for r in items]
        ids, starts, ends, lens = self.enc.encode(texts, spans)
        counts = np.fromiter((len(s) for s in spans), dtype=np.int64, count=len(spans))
        flat = np.array([c for s in spans for c in s], dtype=np.int64).reshape(-1, 2)
        text_lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        mask = label_mask(starts, ends, lens, text_lens, flat[:, 0], flat[:, 1], counts)
        return Encoded(ids, np.where(mask, ids, -100).astype(np.int32), lens, warnings, wheres, left_out)
