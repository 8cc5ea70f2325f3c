"""Loss masks on the real chat templates of 10 model families, token for token against an
independent reference: the same template with `{% generation %}` markers inserted by hand, through
transformers' `apply_chat_template(return_assistant_tokens_mask=True)`.

Each case checks three of distsft's methods against that reference: the marker path (the marked
copy as data.chat_template), the automatic path on the original template (prefix difference where
the template is prefix-stable, differential rendering elsewhere) and differential rendering forced
on every turn."""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from pathlib import Path

import pytest
import trl

from distsft.config.sections import DataSpec
from distsft.data.examples import Encoder
from distsft.errors import SpecError

import mask_harness
from real_templates import CONVERSATIONS, REASONING, TEMPLATES, TOOLS, cases, record, template_path, tokenizer


@pytest.mark.parametrize("name,conv", cases())
def test_mask_equals_generation_marker_reference(name: str, conv: str) -> None:
    mask_harness.assert_matches_reference(tokenizer(name), template_path(name), template_path(name, marked=True),
                                          record(conv), f"{name}/{conv}")


@pytest.mark.parametrize("name", TEMPLATES)
def test_marked_copies_render_like_the_originals(name: str) -> None:
    mask_harness.assert_marked_renders_like_plain(tokenizer(name), template_path(name), template_path(name, True),
                                                  [record(c) for c in sorted({c for t, c in cases() if t == name})])


def test_answer_inside_the_prompt_is_not_labelled_there() -> None:
    """The issue's cases, on the templates that broke: the label is the answer, not its copy in the prompt."""
    for name in ("mistral-7b-instruct-v0.3", "phi-3.5-mini-instruct", "qwen3-0.6b"):
        tok = tokenizer(name)
        enc = Encoder(tok, DataSpec(train_files=["x"], chat_template=str(template_path(name))))
        for conv in ("three_turns_system", "two_turns"):
            (r,) = enc.render("x:1", CONVERSATIONS[conv])
            for (s, e), turn in zip(r.spans, r.turns):
                # the labelled span holds the answer, and no copy of it ends after the span's answer
                k = r.text.rfind(turn["content"].strip(), 0, e)
                assert k >= s, (name, conv, r.text[s:e])


TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
# TRL's own pairs (X.jinja, X_training.jinja with markers) whose markers follow the same convention
# (labelled: what follows the generation prompt, through the end-of-turn text).
TRL_PAIRS = ("cohere", "cohere2", "gemma", "gemma3", "lfm2", "lfm2_v2", "phi3", "phi3_5", "qwen3_instruct_2507")
# Where distsft departs from TRL's markers on purpose: Phi-3/3.5's training templates also label the
# eos_token written after the last message (a final suffix, written after a user message too);
# distsft labels no text after the last message (issue 25).
FINAL_SUFFIX_LABELLED_BY_TRL = ("phi3", "phi3_5")


@lru_cache(maxsize=1)
def _trl_tokenizer():
    """Qwen3's tokenizer plus the special tokens of all those templates (one copy: copies are slow)."""
    tok = copy.deepcopy(tokenizer("qwen3-0.6b"))
    text = "".join(p.read_text() for p in TRL_TEMPLATES.glob("*.jinja") if p.name.split("_training")[0].split(".")[0]
                   in (*TRL_PAIRS, "gptoss"))
    tok.add_special_tokens({"additional_special_tokens": sorted(set(re.findall(
        r"<[|｜][^<>\s'\"]{1,40}[|｜]>|<(?:start|end)_of_turn>|<bos>", text)))})
    return tok


@pytest.mark.parametrize("pair", TRL_PAIRS)
def test_mask_equals_trl_training_templates(pair: str) -> None:
    """A second, independent reference: TRL's hand-marked training templates, with a tokenizer that
    carries each template's special tokens."""
    plain, marked = TRL_TEMPLATES / f"{pair}.jinja", TRL_TEMPLATES / f"{pair}_training.jinja"
    if not marked.is_file():
        pytest.skip(f"this TRL has no {marked.name}")
    tok = _trl_tokenizer()
    enc = Encoder(tok, DataSpec(train_files=["x"], chat_template=str(plain)))
    compared = 0
    for conv, rec in {**CONVERSATIONS, **REASONING, **TOOLS}.items():
        try:
            out = tok.apply_chat_template(rec["messages"], chat_template=marked.read_text(), tools=rec.get("tools"),
                                          tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                          **rec.get("chat_template_kwargs", {}))
        except Exception:  # the template refuses it (e.g. no system role)
            continue
        try:
            got = enc([("x:1", rec)])
        except SpecError as exc:  # a template that cannot render tool calls: refused, not guessed
            assert "does not render the tool calls" in str(exc), str(exc)
            continue
        ids, labels = got.input_ids.tolist(), got.labels.tolist()
        if ids[1:] == list(out["input_ids"]):  # distsft's BOS
            ids, labels = ids[1:], labels[1:]
        if ids != list(out["input_ids"]):
            continue  # the training template renders this conversation differently: nothing to compare
        want = list(out["assistant_masks"])
        if pair in FINAL_SUFFIX_LABELLED_BY_TRL and rec["messages"][-1]["role"] == "assistant":
            assert ids[-1] == tok.eos_token_id and want[-1] == 1
            want[-1] = 0
        assert [int(x != -100) for x in labels] == want, (pair, conv)
        compared += 1
    assert compared >= 5


def test_gpt_oss_history_turn_keeps_its_channel_header_when_its_reasoning_is_dropped() -> None:
    """gpt-oss drops an earlier turn's analysis channel; the turn's span is then what the final render
    shows after the generation prompt `<|start|>assistant`: `<|channel|>final<|message|>B<|end|>`."""
    enc = Encoder(_trl_tokenizer(), DataSpec(train_files=["x"], chat_template=str(TRL_TEMPLATES / "gptoss.jinja")))
    (r,) = enc.render("x:1", REASONING["reasoning_history"], warnings=(w := set()))
    first, last = (r.text[s:e] for s, e in r.spans)
    assert first == "<|channel|>final<|message|>B<|end|>"
    assert last == ("<|channel|>analysis<|message|>A car is a vehicle: A.<|end|><|start|>assistant"
                    "<|channel|>final<|message|>A<|return|>")
    assert any("split" in x for x in w)
