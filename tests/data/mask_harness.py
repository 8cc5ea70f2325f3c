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


def assert_matches_reference(tok, plain: Path, marked: Path, rec: dict, case: str) -> None:
    """distsft's ids and mask equal the reference by all three ways of finding spans (the marked copy's
    markers, the automatic path on the original, differential rendering forced); where the template
    refuses the conversation, distsft refuses it too (exit 2)."""
    import pytest

    from distsft.errors import SpecError
    ref = reference(tok, marked, rec)
    if ref is None:
        with pytest.raises(SpecError, match="x.jsonl:1: the chat template failed"):
            ours(tok, plain, rec)
        return
    ref_ids, ref_mask = ref
    assert sum(ref_mask) > 0
    for template, method in ((marked, "auto"), (plain, "auto"), (plain, "diff")):
        ids, mask = ours(tok, template, rec, method)
        assert ids == ref_ids, (template.name, method)
        if mask != ref_mask:
            got = tok.decode([i for i, m in zip(ids, mask) if m])
            want = tok.decode([i for i, m in zip(ids, ref_mask) if m])
            pytest.fail(f"{case} {template} method={method}: labelled {got!r}, reference {want!r}")


def assert_marked_renders_like_plain(tok, plain: Path, marked: Path, records: list[dict]) -> None:
    """The reference is only as good as the marked copy: every prefix of every conversation renders
    byte-identically (or fails in both)."""
    import pytest

    from distsft.data.chat import ChatRenderer
    a, b = ChatRenderer(tok, plain.read_text()), ChatRenderer(tok, marked.read_text())
    rendered = 0
    for rec in records:
        msgs, tools = rec["messages"], rec.get("tools")
        for k in range(1, len(msgs) + 1):
            for gen in (False, True):
                try:
                    want = a.render(msgs[:k], gen, tools)
                except Exception:
                    with pytest.raises(Exception):
                        b.render(msgs[:k], gen, tools)
                    continue
                assert b.render(msgs[:k], gen, tools) == want
                rendered += 1
    assert rendered > 0
