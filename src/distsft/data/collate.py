"""Batch collator for packed rows that keeps the examples of a row from seeing each other.

How transformers 5.x takes the attention information (checked in masking_utils.py and
modeling_flash_attention_utils.py):
  * sdpa / eager: a 4D `attention_mask` [B, 1, L, L] is used as-is (no causal mask is added on top).
    sdpa takes a bool mask (True = may attend); eager *adds* the mask to the scores, so it needs a
    float mask (0 = attend, dtype min = blocked) -- a bool mask there would silently add 0/1.
  * flash_attention_2/3: varlen only happens for batch size 1 (`_is_packed_sequence` requires it) or
    with explicit `cu_seq_lens_q/k` + `max_length_q/k`. So rows are concatenated into one [1, T]
    sequence ("padding-free", like TRL) and the boundaries are passed explicitly; no attention_mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FLASH = ("flash_attention_2", "flash_attention_3")
MASKED = ("sdpa", "eager")


class PackedCollator:
    """Rows (input_ids, labels, seq_lengths) -> model kwargs with example-isolating attention."""

    def __init__(self, pad_token_id: int, attn_implementation: str, pad_to_multiple_of: int | None = None,
                 mask_dtype: torch.dtype = torch.float32):
        if attn_implementation not in FLASH + MASKED:
            raise ValueError(f"PackedCollator supports {', '.join(FLASH + MASKED)}; got "
                             f"{attn_implementation!r} (resolve 'auto' to the model's implementation first)")
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype  # eager only: the dtype of the additive mask

    def _round(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "seq_lengths" not in rows[0]:
            # Without it a packed row would silently be one long example. HF Trainer drops columns that
            # are not forward() arguments unless remove_unused_columns=False.
            raise KeyError("rows have no 'seq_lengths' (set TrainingArguments.remove_unused_columns=False)")
        ids = [np.asarray(r["input_ids"], dtype=np.int64) for r in rows]
        labels = [np.asarray(r["labels"], dtype=np.int64) for r in rows]
        seqs = [np.asarray(r["seq_lengths"], dtype=np.int64) for r in rows]
        for i, s in zip(ids, seqs):
            if int(s.sum()) != len(i):
                raise ValueError(f"seq_lengths {s.tolist()} do not sum to the row length {len(i)}")
        if self.attn_implementation in FLASH:
            ids, labels, seqs = [np.concatenate(ids)], [np.concatenate(labels)], [np.concatenate(seqs)]
        width = self._round(max(len(i) for i in ids))
        B = len(ids)
        input_ids = np.full((B, width), self.pad_token_id, dtype=np.int64)
        out_labels = np.full((B, width), -100, dtype=np.int64)
        position_ids = np.zeros((B, width), dtype=np.int64)
        # Segment number of every token; padding gets its own segment per position (attends to itself).
        segment = np.broadcast_to(np.arange(width) + 1_000_000, (B, width)).copy()
        for b, (i, lab, s) in enumerate(zip(ids, labels, seqs)):
            n = len(i)
            input_ids[b, :n] = i
            out_labels[b, :n] = lab
            starts = np.repeat(np.cumsum(s) - s, s)
            position_ids[b, :n] = np.arange(n) - starts
            position_ids[b, n:] = np.arange(width - n)  # padding: a sequence of its own, from 0
            segment[b, :n] = np.repeat(np.arange(len(s)), s)
            out_labels[b, np.cumsum(s) - s] = -100  # first token of each example: not a target
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(out_labels),
                 "position_ids": torch.from_numpy(position_ids)}
        if self.attn_implementation in FLASH:
            pad = width - len(ids[0])
            lens = np.concatenate([seqs[0], [pad] if pad else []]).astype(np.int64)
            cu = torch.from_numpy(np.concatenate(([0], np.cumsum(lens))).astype(np.int32))
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lens.max()),
                         max_length_k=int(lens.max()))
            return batch
        seg = torch.from_numpy(segment)
        causal = torch.ones(width, width, dtype=torch.bool).tril_()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, L, L]: same example and not later
        mask = mask[:, None]
        if self.attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=self.mask_dtype).masked_fill_(
                ~mask, torch.finfo(self.mask_dtype).min)
        batch["attention_mask"] = mask
        return batch


def row_checksum(input_ids: Any) -> int:
    """A content fingerprint of one packed row. Summed over a step's rows on all ranks it identifies
    which samples the step consumed (logged as batch_checksum), whatever the process count."""
    ids = np.asarray(input_ids, dtype=np.int64)
    return int((ids * (np.arange(len(ids)) % 7919 + 1)).sum() % 1_000_003)
