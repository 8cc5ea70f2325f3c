"""Offset-aware batch tokenization, per-token labels from character spans, and the tokenizer's fingerprint."""

from __future__ import annotations

import hashlib
import json
from itertools import chain
from typing import Any

import numpy as np


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
