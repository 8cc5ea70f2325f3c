"""The two sides every template mask test compares: transformers' assistant mask through a
`{% generation %}`-marked copy of the template (the independent reference), and distsft's ids and mask
by each way it finds spans."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distsft.config.sections import DataSpec
from distsft.data.encode import label_mask
from distsft.data.examples import Encoder


def _plain(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "loss"} for m in messages]


def reference(tok, marked: Path, rec: dict) -> tuple[list[int], list[int]] | None:
    """transformers' ids and assistant mask with the marked template; None if the template refuses."""
    try:
        out = tok.apply_chat_template(_plain(rec["messages"]), chat_template=marked.read_text(),
                                      tools=rec.get("tools"), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, **rec.get("chat_template_kwargs", {}))
    except Exception as exc:  # e.g. Gemma: "System role not supported"
        if "TemplateError" in type(exc).__name__:
            return None
        raise
    return list(out["input_ids"]), list(out["assistant_masks"])


def ours(tok, template: Path, rec: dict, method: str = "auto") -> tuple[list[int], list[int]]:
    """distsft's ids and mask (through the per-chunk Encoder, or with spans located by `method`)."""
    enc = Encoder(tok, DataSpec(train_files=["x.jsonl"], chat_template=str(template)))
    if method == "auto":
        out = enc([("x.jsonl:1", rec)])
        ids, labels = out.input_ids.tolist(), out.labels.tolist()
        text = enc.render("x.jsonl:1", rec)[0].text
    else:
        (r,) = enc.render("x.jsonl:1", rec, method=method)
        ids_a, starts, ends, lens = enc.enc.encode([r.text], [r.spans])
        sp = np.array(r.spans, dtype=np.int64).reshape(-1, 2)
        mask = label_mask(starts, ends, lens, np.array([len(r.text)]), sp[:, 0], sp[:, 1], np.array([len(sp)]))
        ids, labels, text = ids_a.tolist(), np.where(mask, ids_a, -100).tolist(), r.text
    raw = enc.renderer.render(_plain(rec["messages"]), tools=rec.get("tools"))
    if text != raw:  # distsft prepends the BOS a tokenizer adds by default when the template writes none
        assert text == tok.bos_token + raw and ids[0] == tok.bos_token_id and labels[0] == -100
        ids, labels = ids[1:], labels[1:]
    return ids, [int(x != -100) for x in labels]
