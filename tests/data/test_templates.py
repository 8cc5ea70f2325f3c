"""data.chat_template: a path, a tokenizer directory or tokenizer_config.json, a shipped name, a variant of
the tokenizer's templates or inline Jinja; anything else exit 2 saying which was expected (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distsft.config import templates as config_templates
from distsft.data import templates
from distsft.errors import SpecError

REAL = Path(__file__).resolve().parent / "real_templates"


def test_named_templates_ship_chatml_and_the_real_families() -> None:
    assert "chatml" in config_templates.NAMES
    for family in ("llama-3.1", "llama-3.2", "qwen2.5", "qwen3", "mistral-v0.3", "phi-3.5", "phi-4", "gemma-2",
                   "deepseek-r1-distill"):
        assert family in config_templates.NAMES, family
    # The shipped texts are the model repositories' templates, byte for byte.
    assert config_templates.resolve_text("qwen2.5").text == (REAL / "qwen2.5-7b-instruct.jinja").read_text()
    gemma = json.loads((REAL / "gemma-2-2b-it.tokenizer_config.json").read_text())["chat_template"]
    assert config_templates.resolve_text("gemma-2").text == gemma
    t = config_templates.resolve_text("chatml")
    assert "named template" in t.origin and "chatml" in t.origin


def test_chatml_renders_chatml(tiny_tokenizer) -> None:
    tiny_tokenizer.chat_template = config_templates.resolve_text("chatml").text
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                              tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"


def test_paths_directories_and_tokenizer_configs(tmp_path, tiny_tokenizer) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}")
    assert templates.resolve(tiny_tokenizer, str(f)).text == f.read_text()
    cfg = REAL / "deepseek-r1-distill-qwen-32b.tokenizer_config.json"
    want = json.loads(cfg.read_text())["chat_template"]
    assert templates.resolve(tiny_tokenizer, str(cfg)).text == want
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(cfg.read_text())
    assert templates.resolve(tiny_tokenizer, str(d)).text == want
    (d / "chat_template.jinja").write_text("{{ 'jinja file wins' }}")  # as transformers loads it
    assert templates.resolve(tiny_tokenizer, str(d)).text == "{{ 'jinja file wins' }}"
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert templates.resolve(tiny_tokenizer, inline).text == inline
    own = templates.resolve(tiny_tokenizer, None)
    assert own.text == tiny_tokenizer.chat_template and "tokenizer" in own.origin


@pytest.mark.parametrize("value, says", [
    ("chatlm", "not one of the named templates"),                 # a mistyped name
    ("templates/chatml.jinja", "no such file or directory: templates/chatml.jinja"),  # a mistyped path
])
def test_anything_else_says_what_was_expected(value, says, tiny_tokenizer) -> None:
    for call in (lambda: config_templates.check(value), lambda: templates.resolve(tiny_tokenizer, value)):
        try:
            call()
        except SpecError as exc:
            msg = str(exc)
            assert "data.chat_template" in msg and says in msg and "chatml" in msg, msg
            assert "tokenizer directory" in msg and ".jinja" in msg
        else:
            assert says == "not one of the named templates", "check() lets only bare words through"


def test_a_config_without_a_template_and_a_bare_directory_are_refused(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(SpecError, match=r"data.chat_template: .*tokenizer_config.json has no chat_template"):
        config_templates.check(str(tmp_path / "tokenizer_config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match=r"data.chat_template: directory .*empty has neither chat_template.jinja"):
        config_templates.check(str(empty))


def test_variants_of_the_tokenizers_templates(tiny_tokenizer) -> None:
    tiny_tokenizer.chat_template = {"default": "{{ 'd' }}", "tool_use": "{{ 't' }}"}
    assert templates.resolve(tiny_tokenizer, "tool_use").text == "{{ 't' }}"
    assert templates.resolve(tiny_tokenizer, None).text == "{{ 'd' }}"
    with pytest.raises(SpecError, match="the tokenizer's own variants are default, tool_use"):
        templates.resolve(tiny_tokenizer, "rag")


def test_apply_to_tokenizer_saves_the_trained_template(tmp_path, tiny_tokenizer) -> None:
    tiny_tokenizer.chat_template = {"default": "{{ 'd' }}", "tool_use": "{{ 't' }}"}
    t = templates.apply_to_tokenizer(tiny_tokenizer, "tool_use")
    # Resolving the spec's value again (generation, the cache key) still gives the trained template.
    assert templates.resolve(tiny_tokenizer, "tool_use") == t
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == "{{ 't' }}"


def test_describe_without_a_tokenizer(tmp_path) -> None:
    assert config_templates.describe(None, "org/model") == "the chat template of the tokenizer org/model"
    d = config_templates.describe("chatml", "m")
    assert "chatml" in d and "sha256" in d
    assert "named template of the tokenizer m" in config_templates.describe("tool_use", "m")
