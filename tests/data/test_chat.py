"""Per-turn loss control, reasoning, tools and refusals, on real templates and tokenizers."""

from __future__ import annotations

import json

import pytest

from distsft.data.examples import REASONING_HISTORY, Encoder
from distsft.config.sections import DataSpec
from distsft.errors import SpecError

from real_templates import REASONING, TOOLS, a, template_path, tokenizer, u


def encoder(name: str, **data) -> Encoder:
    return Encoder(tokenizer(name), DataSpec(train_files=["x.jsonl"], chat_template=str(template_path(name)),
                                             **data))


def labelled(enc: Encoder, rec: dict) -> tuple[list[str], set[str]]:
    """The decoded loss-carrying text of each example of `rec`, and the chunk's warnings."""
    out = enc([("x.jsonl:1", rec)])
    texts, p = [], 0
    for n in out.lengths.tolist():
        ids, labels = out.input_ids[p:p + n].tolist(), out.labels[p:p + n].tolist()
        texts.append(enc.tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100]))
        p += n
    return texts, out.warnings


def test_assistant_turns_all_last_split_on_qwen3_history_reasoning() -> None:
    rec = REASONING["reasoning_history"]
    (all_,), warns = labelled(encoder("qwen3-0.6b"), rec)
    # The final render drops the first turn's think block: its answer carries loss, its reasoning cannot.
    assert "Apple is a fruit" not in all_ and all_.startswith("B<|im_end|>")
    assert "<think>\nA car is a vehicle: A.\n</think>\n\nA<|im_end|>" in all_
    assert REASONING_HISTORY in warns and "split" in REASONING_HISTORY
    (last,), _ = labelled(encoder("qwen3-0.6b", assistant_turns="last"), rec)
    assert last == "<think>\nA car is a vehicle: A.\n</think>\n\nA<|im_end|>\n"
    split, warns = labelled(encoder("qwen3-0.6b", assistant_turns="split"), rec)
    assert split == ["<think>\nApple is a fruit, so B.\n</think>\n\nB<|im_end|>\n", last]
    assert not warns


def test_think_block_in_content_is_reasoning_for_templates_that_read_it() -> None:
    split, _ = labelled(encoder("qwen3-0.6b", assistant_turns="split"), REASONING["think_in_content"])
    assert split == ["<think>\nadd them\n</think>\n\n4<|im_end|>\n", "<think>\nagain\n</think>\n\n6<|im_end|>\n"]
    # DeepSeek-R1-distill's template drops think blocks everywhere, even in the last turn: said once.
    (r1,), warns = labelled(encoder("deepseek-r1-distill-qwen-32b"), REASONING["think_in_content"])
    assert "again" not in r1 and r1.endswith("6<｜end▁of▁sentence｜>")
    assert any("even as the last turn" in w for w in warns)


def test_loss_false_and_chat_template_kwargs() -> None:
    rec = {"chat_template_kwargs": {"enable_thinking": False},
           "messages": [u("Pick: A) car B) apple"), a("B", loss=False), u("Vehicle?"), a("A")]}
    enc = encoder("qwen3-0.6b")
    (text,), _ = labelled(enc, rec)
    # enable_thinking=false reached the template: the final turn has the empty think block of the
    # generation prompt, which is not generated, so it carries no loss.
    (r,) = enc.render("x.jsonl:1", rec)
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>" in r.text
    assert text == "A<|im_end|>\n"
    with pytest.raises(SpecError, match=r"x.jsonl:1: no assistant turn carries loss"):
        labelled(enc, {"messages": [u("q"), a("B", loss=False)]})
    with pytest.raises(SpecError, match="chat_template_kwargs may not set tools"):
        labelled(enc, {**rec, "chat_template_kwargs": {"tools": []}})


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "mistral-7b-instruct-v0.3"])
def test_tool_calls_carry_loss_tool_results_never(name: str) -> None:
    rec = TOOLS["tools"]
    (text,), _ = labelled(encoder(name), rec)
    assert "get_weather" in text and "Paris" in text and "It is 22C and sunny in Paris." in text
    assert "22C, sunny" not in text and "Current weather of a city" not in text
    # tools given as a JSON string (Arrow cannot hold free-form schemas) are the same tools
    (again,), _ = labelled(encoder(name), {**rec, "tools": json.dumps(rec["tools"])})
    assert again == text


ECHO = ("{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}"
        "{% if not loop.last %} (answers so far: {% for x in messages if x.role == 'assistant' %}{{ x.content }};"
        "{% endfor %}){% endif %}<|im_end|>\n{% else %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_ambiguous_span_is_refused_with_file_line_turn_and_template(tmp_path) -> None:
    """A template that also writes the answers into an earlier message: no unambiguous span, exit 2."""
    path = tmp_path / "echo.jinja"
    path.write_text(ECHO)
    enc = Encoder(tokenizer("qwen3-0.6b"), DataSpec(train_files=["x.jsonl"], chat_template=str(path)))
    rec = {"messages": [u("Say B"), a("B"), u("Again"), a("B!")]}
    with pytest.raises(SpecError) as err:
        enc([("data.jsonl:7", rec)])
    msg = str(err.value)
    assert msg.startswith("data.jsonl:7: ") and "assistant turn 1" in msg and str(path) in msg
    assert "{% generation %}" in msg and "data.chat_template" in msg


def test_template_that_does_not_render_the_answer_is_refused(tmp_path) -> None:
    path = tmp_path / "drop.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role != 'assistant' or loop.last %}"
                    "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}")
    enc = Encoder(tokenizer("qwen3-0.6b"), DataSpec(train_files=["x.jsonl"], chat_template=str(path)))
    with pytest.raises(SpecError, match=r"d.jsonl:2: the template does not render the content of assistant turn 1"):
        enc([("d.jsonl:2", {"messages": [u("q"), a("B"), u("r"), a("C")]})])


def test_sanity_mask_check_passes_exact_spans_and_fails_the_first_copy_bug(monkeypatch) -> None:
    """distsft sanity's check: it passes the real spans, and fails spans that label the answer's
    first copy (the old `full.find(content)` fallback: the "B" of "Bob")."""
    from distsft.data import chat, inspect
    name = "qwen3-0.6b"
    spec = DataSpec(train_files=["x.jsonl"], chat_template=str(template_path(name)))
    rec = {"messages": [{"role": "system", "content": "You are Bob."}, u("Pick: A) car B) apple"), a("B"),
                        u("Again?"), a("B")]}
    shown: list[str] = []
    assert inspect.check_records(tokenizer(name), spec, [("x.jsonl:1", rec)], show=shown.append) == []
    assert "[[B<|im_end|>\n]]" in shown[0]

    exact = chat.ChatRenderer.assistant_spans

    def first_copy(self, messages, tools=None, extra=None, turns=None, method="auto"):
        if method != "auto":  # the cross-check's own method stays exact
            return exact(self, messages, tools, extra, turns, method)
        full = self.render(messages, False, tools, extra)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                k = full.find(m["content"], cursor)
                spans.append(chat.Span(i, k, k + len(m["content"])))
                cursor = k + len(m["content"])
        return full, spans

    monkeypatch.setattr(chat.ChatRenderer, "assistant_spans", first_copy)
    verdicts = inspect.check_records(tokenizer(name), spec, [("x.jsonl:1", rec)], show=shown.append)
    assert verdicts and all(v == "FAIL" for v, _ in verdicts), verdicts
    assert "does not end where its turn's answer ends" in verdicts[0][1]


def test_refusal_is_exit_2_before_training(tmp_path) -> None:
    import helpers as h
    (tmp_path / "echo.jinja").write_text(ECHO)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [u("Say B"), a("B")]}) + "\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out").read_text()
    spec = spec.replace(f"train_files: {h.TRAIN}", f"train_files: {data}\n  chat_template: {tmp_path / 'echo.jinja'}")
    (tmp_path / "spec.yaml").write_text(spec.replace(f"  eval_files: {h.EVAL}\n", ""))
    p = h.run("run", tmp_path / "spec.yaml", "--gpus", "1")
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"{data}:1: the template renders the content of assistant turn 1 2 times" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out" / "metrics.jsonl").exists()
