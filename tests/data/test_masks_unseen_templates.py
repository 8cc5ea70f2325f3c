"""Loss masks on templates no other test has seen (issue 25): only assistant turns carry loss.

Text a template renders that belongs to no message -- before the first message, or after the last
one (a generation prompt written whatever add_generation_prompt says, a final suffix) -- never
carries loss, whichever way the spans are found. The end of an assistant turn keeps its convention
(its end-of-turn token and the whitespace written right after it); where it cannot be told from the
text that follows, the conversation is refused (exit 2).

Every accepted template is checked token for token against an independent reference: a
`{% generation %}`-marked copy through transformers' `apply_chat_template(return_assistant_tokens_mask=True)`,
by the three ways distsft finds spans (the marked copy's markers, the automatic path on the original,
differential rendering forced on every turn)."""

from __future__ import annotations

import json
import re

import pytest

from distsft.config.sections import DataSpec
from distsft.data.examples import Encoder
from distsft.errors import SpecError

import mask_harness
from unseen_templates import (ACCEPTED, ADVERSARIAL_TEMPLATES, ALL_CONVERSATIONS, REAL_FAMILIES, REFUSED, cases,
                              template_path, tokenizer)


@pytest.mark.parametrize("name,conv", cases())
def test_mask_equals_generation_marker_reference(name: str, conv: str) -> None:
    mask_harness.assert_matches_reference(tokenizer(name), template_path(name), template_path(name, marked=True),
                                          ALL_CONVERSATIONS[conv], f"{name}/{conv}")


@pytest.mark.parametrize("name", ACCEPTED)
def test_marked_copies_render_like_the_originals(name: str) -> None:
    mask_harness.assert_marked_renders_like_plain(tokenizer(name), template_path(name), template_path(name, True),
                                                  list(ALL_CONVERSATIONS.values()))


# template -> (what it writes after the last assistant turn's end, which carries no loss,
#              the text the last labelled token ends with)
TRAILING = {
    "llama-3-8b-instruct-original": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "trailing-generation-prompt": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "final-suffix": ("<|endoftext|>", "<|im_end|>\n"),
    "phi-4-mini-instruct": ("<|endoftext|>", "<|end|>"),
}


@pytest.mark.parametrize("name", sorted(TRAILING))
def test_text_after_the_last_message_carries_no_loss(name: str) -> None:
    """The issue's case, named: the trailing text is rendered, tokenized, and unlabelled; the last
    labelled token is the turn's own end-of-turn token."""
    after, end = TRAILING[name]
    tok = tokenizer(name)
    enc = Encoder(tok, DataSpec(train_files=["x.jsonl"], chat_template=str(template_path(name))))
    for conv in ("choice", "two_turns", "three_turns_system"):
        rec = ALL_CONVERSATIONS[conv]
        (r,) = enc.render("x.jsonl:1", rec)
        assert r.text.endswith(after)
        s, e = r.spans[-1]
        assert r.text[s:e].endswith(end) and e == len(r.text) - len(after), r.text[s:]
        out = enc([("x.jsonl:1", rec)])
        labels = out.labels.tolist()
        n_after = len(tok(after, add_special_tokens=False)["input_ids"])
        assert labels[-n_after:] == [-100] * n_after
        assert labels[-n_after - 1] != -100


@pytest.mark.parametrize("name", REFUSED)
def test_a_turn_whose_end_cannot_be_told_is_refused(name: str) -> None:
    """No end-of-turn token of the turn's own before the trailing text: where the turn ends cannot be
    told, so the conversation is refused, naming the record and the template (exit 2 upstream)."""
    path = template_path(name)
    enc = Encoder(tokenizer(name), DataSpec(train_files=["x.jsonl"], chat_template=str(path)))
    for conv in ("choice", "two_turns"):
        with pytest.raises(SpecError) as err:
            enc([("x.jsonl:7", ALL_CONVERSATIONS[conv])])
        msg = str(err.value)
        assert msg.startswith("x.jsonl:7: ") and str(path) in msg and "cannot be told" in msg, msg


def test_refusal_is_exit_2_from_the_command_line(tmp_path) -> None:
    """`distsft prepare` on data whose template hides the end of a turn: exit 2, the file:line named."""
    import helpers as h
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(ALL_CONVERSATIONS["choice"]) + "\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out")
    p = h.run("prepare", str(spec), f"data.train_files=[{data}]", "data.eval_files=[]",
              f"data.chat_template={template_path('glued-header-trailing-prompt')}")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"{data}:1" in p.stdout + p.stderr and "cannot be told" in p.stdout + p.stderr


def test_adversarial_templates_are_each_what_their_name_says() -> None:
    """Guard against a template that silently stopped testing its assumption."""
    tok = tokenizer(ADVERSARIAL_TEMPLATES[0])
    from distsft.data.chat import ChatRenderer
    r = {n: ChatRenderer(tok, template_path(n).read_text()) for n in ADVERSARIAL_TEMPLATES}
    conv = ALL_CONVERSATIONS["two_turns"]["messages"]
    assert r["trailing-generation-prompt"].render(conv, False).endswith("B<|im_end|>\n<|im_start|>assistant\n")
    assert r["final-suffix"].render(conv, False).endswith("B<|im_end|>\n<|endoftext|>")
    assert r["final-suffix"].render(conv[:1], False).endswith("<|im_end|>\n<|endoftext|>")  # after any role
    text = r["last-turn-end-differs"].render(conv, False)
    assert "B<|end|>\n" in text and text.endswith("B<|return|>")
    assert "Ada Lovelace wrote" in r["default-system-prompt"].render(conv, False)
    assert "<answer>B</answer><|im_end|>" in r["rewritten-content"].render(ALL_CONVERSATIONS["tagged"]["messages"])
    assert r["plain-text-trailing-prompt"].render(conv, False).endswith("Assistant: B\nAssistant:")
    assert r["glued-header-trailing-prompt"].render(conv, False).endswith("B\n<|assistant|>\n")


def test_every_new_real_template_has_its_provenance() -> None:
    from unseen_templates import REAL
    provenance = (REAL / "PROVENANCE.md").read_text()
    for name in REAL_FAMILIES:
        assert f"`{name}.jinja`" in provenance, name
    readme = (template_path(ADVERSARIAL_TEMPLATES[0]).parent / "README.md").read_text()
    for name in ADVERSARIAL_TEMPLATES:
        assert re.search(rf"`{re.escape(name)}\.jinja`", readme), name
