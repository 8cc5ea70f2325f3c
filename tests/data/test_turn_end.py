"""Where the last assistant turn ends (data.turn_end), the end-of-turn token warning (train.stops), and sanity
showing the text after the last message unmarked (issue 25)."""

from __future__ import annotations

import re

import pytest

from distsft.config.sections import DataSpec
from distsft.data.turn_end import turn_end
from distsft.train.stops import turn_end_token, turn_end_warning
from distsft.data.turns import TemplateMismatch

from unseen_templates import ALL_CONVERSATIONS, template_path, tokenizer

TOKENS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_end|>", "<|im_start|>", "<|end|>",
          "<|user|>", "<|assistant|>", "<|endoftext|>", "<extra_id_1>", "<|return|>", "</s>"]
ADDED = re.compile("|".join(map(re.escape, sorted(TOKENS, key=len, reverse=True))))
HDR = "<|start_header_id|>assistant<|end_header_id|>\n\n"


# (tail after the last turn's content, the end of a render whose last message is another one,
#  what follows the content when another message comes next, the turn's own end or None: refused)
CASES = {
    "llama-3 trailing prompt": ("<|eot_id|>" + HDR, "Q<|eot_id|>" + HDR,
                                "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nN", "<|eot_id|>"),
    "chatml trailing prompt": ("<|im_end|>\n<|im_start|>assistant\n", "Q<|im_end|>\n<|im_start|>assistant\n",
                               "<|im_end|>\n<|im_start|>user\nN", "<|im_end|>\n"),
    "phi-3 final eos": ("<|end|>\n<|endoftext|>", "Q<|end|>\n<|endoftext|>", "<|end|>\n<|user|>\nN", "<|end|>\n"),
    "phi-4-mini final eos, no separator": ("<|end|><|endoftext|>", "Q<|end|><|endoftext|>", "<|end|><|user|>N",
                                           "<|end|>"),
    "a last-turn token no other message ends with": ("<|return|>", "Q<|end|>", "<|end|><|user|>", "<|return|>"),
    "written after every message, followed or not": ("<|im_end|></s>", "Q<|im_end|></s>",
                                                     "<|im_end|></s><|im_start|>user", "<|im_end|></s>"),
    "unknown continuation: the first token ends the turn": ("<|eot_id|>" + HDR, "Q<|eot_id|>" + HDR, None,
                                                            "<|eot_id|>"),
    "no end-of-turn token, plain text after": ("\nAssistant:", "Q\nAssistant:", "\nUser: N", None),
    "the header token opens the trailing prompt": ("\n<|assistant|>\n", "Q\n<|assistant|>\n", "\n<|user|>\nN", None),
    "one header token for every role (Nemotron-Mini)": ("\n<extra_id_1>Assistant\n", "Q\n<extra_id_1>Assistant\n",
                                                        "\n<extra_id_1>User\nN", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_last_turn_keeps_its_end_and_nothing_after_the_last_message(case: str) -> None:
    tail, other, followed, want = CASES[case]
    if want is None:
        with pytest.raises(TemplateMismatch, match="cannot be told"):
            turn_end(tail, other, followed, ADDED)
    else:
        assert tail[:turn_end(tail, other, followed, ADDED)] == want


def _llama3_original_with_eos(eos_ids: list[int]):
    tok = tokenizer("llama-3-8b-instruct-original")
    return turn_end_warning(tok, template_path("llama-3-8b-instruct-original").read_text(), eos_ids)


def test_a_template_ending_turns_off_the_eos_is_named_with_what_the_model_will_stop_on() -> None:
    tok = tokenizer("llama-3-8b-instruct-original")
    assert tok.eos_token == "<|end_of_text|>"
    eot, end_of_text = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert turn_end_token(tok, template_path("llama-3-8b-instruct-original").read_text()) == "<|eot_id|>"
    msg, carried = _llama3_original_with_eos([])  # no generation_config: the tokenizer's eos
    assert carried == [end_of_text, eot]
    assert "<|eot_id|>" in msg and f"id {eot}" in msg and "<|end_of_text|>" in msg
    assert f"generation_config will carry eos_token_id {[end_of_text, eot]}" in msg
    assert _llama3_original_with_eos([end_of_text, eot]) == (None, [end_of_text, eot])  # it stops there already
    # Templates whose turns end with the eos (or with the generation prompt's own token) say nothing.
    for name in ("phi-4-mini-instruct", "trailing-generation-prompt"):
        tok = tokenizer(name)
        want = "<|end|>" if name == "phi-4-mini-instruct" else "<|im_end|>"
        assert turn_end_token(tok, template_path(name).read_text()) == want
        msg, _ = turn_end_warning(tok, template_path(name).read_text(), [])
        assert (msg is not None) == (want != tok.eos_token), (name, msg)


def test_sanity_shows_the_trailing_text_unmarked() -> None:
    from distsft.data.inspect import check_records
    shown: list[str] = []
    name = "llama-3-8b-instruct-original"
    spec = DataSpec(train_files=["x.jsonl"], chat_template=str(template_path(name)))
    results = check_records(tokenizer(name), spec, [("x.jsonl:1", ALL_CONVERSATIONS["two_turns"])], show=shown.append)
    assert not [m for v, m in results if v == "FAIL"], results
    assert shown[0].endswith("B<|eot_id|>]]" + HDR), shown[0]
    assert shown[1] == f"  after the last labelled span, carrying no loss: {HDR!r}"


def test_a_header_token_after_the_answer_is_not_taken_for_its_end() -> None:
    """GLM-like: no end-of-turn token, the assistant header written again after the last answer."""
    from distsft.data.chat import ChatRenderer
    tok = tokenizer("glued-header-trailing-prompt")
    r = ChatRenderer(tok, "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
                          "{{ '<|assistant|>' }}")
    with pytest.raises(TemplateMismatch, match="cannot be told"):
        r.assistant_spans(ALL_CONVERSATIONS["choice"]["messages"])
