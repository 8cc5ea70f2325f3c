"""Batch collator for packed rows that keeps the examples of a row from seeing each other.

How transformers 5.x takes the attention information (checked in masking_utils.py and
modeling_flash_attention_utils.py):
  * sdpa / eager: no mask at all. Positions restart at 0 at every example, and with no attention_mask
    and no cache (`_preprocess_mask_arguments`) the model finds the examples from the position ids
    (`find_packed_sequence_indices`: a new one wherever positions do not go up by 1) and builds each
    layer type's mask itself, on its own device: full-causal layers causal within the example,
    sliding-window layers (Mistral, Gemma-2/3, gpt-oss, Cohere2) windowed within the example. A
    prebuilt 4D mask, which distsft passed before, reached the sliding layers unchanged (4D masks are
    returned as-is), so they trained with full causal attention -- and it cost O(L^2) host memory and a
    host-to-device copy per micro-batch.
  * flash_attention_2/3: varlen only happens for batch size 1 (`_is_packed_sequence` requires it) or
    with explicit `cu_seq_lens_q/k` + `max_length_q/k`. So rows are concatenated into one [1, T]
    sequence ("padding-free", like TRL) and the boundaries are passed explicitly; each layer passes its
    own window to flash-attn.
  * `explicit_mask=True` (models from remote code, which may not derive masks from positions): the 4D
    block mask [B, 1, L, L] as before -- bool for sdpa, additive float for eager (eager *adds* it).
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
                 explicit_mask: bool = False, mask_dtype: torch.dtype = torch.float32):
        if attn_implementation not in FLASH + MASKED:
            raise ValueError(f"PackedCollator supports {', '.join(FLASH + MASKED)}; got "
                             f"{attn_implementation!r} (resolve 'auto' to the model's implementation first)")
        self.pad_token_id = pad_token_id
        self.attn_implementation = attn_implementation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.explicit_mask = explicit_mask
        self.mask_dtype = mask_dtype  # explicit eager masks only: the dtype of the additive mask

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
        # Padding restarts its positions too (above): a sequence of its own, never part of an example.
        batch["use_cache"] = False  # transformers derives packed masks only without a cache
        if not self.explicit_mask:
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
