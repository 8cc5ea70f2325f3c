"""Records to tokenized examples: the per-chunk unit of the build.

`Encoder(tokenizer, spec)` is built once per process (it compiles the chat template and probes the
tokenizer); calling it on a chunk of `(where, record)` pairs converts each record to a conversation
(formats.py), renders it and locates the loss-carrying spans (chat.py), tokenizes the chunk in one
batch and labels tokens by their character offsets (encode.py). The result is flat numpy arrays,
before overlong handling and packing, so the build can run it in worker processes and concatenate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from distsft.data.chat import ChatRenderer, TemplateMismatch, resolve_chat_template
from distsft.data.encode import OffsetEncoder, label_mask
from distsft.data.formats import _conversation
from distsft.spec import SpecError


@dataclass
class Encoded:
    input_ids: np.ndarray   # int32, all examples of the chunk back to back
    labels: np.ndarray      # int32, -100 where a token carries no loss
    lengths: np.ndarray     # int64, tokens per example
    warnings: set[str] = field(default_factory=set)  # said once per build, whatever the chunking


class Encoder:
    def __init__(self, tokenizer: Any, spec: Any):
        self.spec = spec
        self.renderer = ChatRenderer(tokenizer, resolve_chat_template(tokenizer, spec.chat_template))
        self.enc = OffsetEncoder(tokenizer)

    def spans(self, conv: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text (BOS included) and its loss-carrying character spans."""
        try:
            text, sp = self.renderer.assistant_spans(conv)
        except TemplateMismatch as exc:
            raise SpecError(f"{where}: {exc}; the chat template rewrites assistant messages, so the loss "
                            "mask cannot be found. Set data.chat_template to one that keeps them") from None
        except Exception as exc:
            raise SpecError(f"{where}: the chat template failed on this conversation: "
                            f"{type(exc).__name__}: {exc}") from None
        text, shift = self.enc.add_bos(text)
        return text, [(s + shift, e + shift) for s, e in sp]

    def __call__(self, pairs: Sequence[tuple[str, Any]]) -> Encoded:
        texts, spans, text_lens = [], [], []
        for where, rec in pairs:
            text, sp = self.spans(_conversation(rec, where, self.spec), where)
            texts.append(text)
            spans.append(sp)
            text_lens.append(len(text))
        if not texts:
            empty = np.zeros(0, dtype=np.int32)
            return Encoded(empty, empty.copy(), np.zeros(0, dtype=np.int64))
        ids, starts, ends, lens = self.enc.encode(texts, spans)
        counts = np.fromiter((len(s) for s in spans), dtype=np.int64, count=len(spans))
        flat = np.array([c for s in spans for c in s], dtype=np.int64).reshape(-1, 2)
        mask = label_mask(starts, ends, lens, np.asarray(text_lens, dtype=np.int64),
                          flat[:, 0], flat[:, 1], counts)
        return Encoded(ids, np.where(mask, ids, -100).astype(np.int32), lens)
