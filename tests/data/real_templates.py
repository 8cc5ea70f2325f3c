"""The real chat templates of tests/data/real_templates/, each with a real tokenizer carrying its
special tokens (from npm, installed by `make test-assets`), and the conversations the mask tests use."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REAL = HERE / "real_templates"
MARKED = HERE / "templates_with_generation"
TOKENIZERS = HERE.parent / "assets" / "tokenizers"

# DeepSeek-R1-distill's special tokens: its bos/eos and those its template writes (<｜User｜>, ...).
_DEEPSEEK = sorted(set(re.findall(r"<｜[^｜]*｜>", (REAL / "deepseek-r1-distill-qwen-32b.jinja").read_text())))
# template -> (npm tokenizer, special tokens to set, extra special tokens). Where the family's own
# tokenizer is not on a registry, a closely related one gets the template's special tokens added.
FAMILIES = {
    "llama-3.1-8b-instruct": ("llama3_1", {}, []),
    "llama-3.2-3b-instruct": ("llama3_1", {}, []),
    "qwen2.5-7b-instruct": ("qwen3", {}, []),
    "qwen3-0.6b": ("qwen3", {}, []),
    "deepseek-r1-distill-qwen-32b": ("qwen3", {"bos_token": "<｜begin▁of▁sentence｜>",
                                               "eos_token": "<｜end▁of▁sentence｜>"},
                                     _DEEPSEEK),
    "gemma-2-2b-it": ("gemma3", {"eos_token": "<eos>"}, []),
    "mistral-7b-instruct-v0.3": ("llama2", {}, ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "phi-3.5-mini-instruct": ("llama2", {"eos_token": "<|endoftext|>"},
                              ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi-4": ("gpt35turbo", {}, ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "smollm2-135m-instruct": ("gpt35turbo", {}, ["<|im_start|>", "<|im_end|>"]),
}
TEMPLATES = sorted(FAMILIES)


def family_tokenizer(pkg: str, special: dict, extra: list, name: str):
    """The npm tokenizer `pkg` with a template's special tokens (FAMILIES' rows, and unseen_templates')."""
    from transformers import PreTrainedTokenizerFast
    d = TOKENIZERS / pkg
    if not (d / "tokenizer.json").is_file():
        msg = f"tokenizer {pkg} missing in {TOKENIZERS}: run `make test-assets`"
        if os.environ.get("DISTSFT_REQUIRE_TEST_ASSETS") or os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    kw = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), **{**kw, **special})
    tok.name_or_path = f"{pkg} (for {name})"
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


@lru_cache(maxsize=None)
def _tokenizer(name: str):
    return family_tokenizer(*FAMILIES[name], name)


def tokenizer(name: str):
    """The family's tokenizer, shared: pass templates explicitly (data.chat_template, chat_template=)."""
    return _tokenizer(name)


def template_path(name: str, marked: bool = False) -> Path:
    return (MARKED if marked else REAL) / f"{name}.jinja"


def template(name: str, marked: bool = False) -> str:
    return template_path(name, marked).read_text()


SYSTEM = "You are Bob, a careful assistant."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "id": "call0ABCD",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str, **kw) -> dict:
    return {"role": "assistant", "content": text, **kw}


# name -> record. Answers whose text also appears in the system or user message, 1-3 turns,
# unicode and surrounding whitespace.
CONVERSATIONS = {
    "choice": {"messages": [u("Which is a fruit? A) car B) apple"), a("B")]},
    "choice_system": {"messages": [{"role": "system", "content": SYSTEM}, u("Which is a fruit? A) car B) apple"),
                                   a("B")]},
    "extract": {"messages": [u("Extract the name: 'Ada Lovelace wrote the first program.'"), a("Ada Lovelace")]},
    "two_turns": {"messages": [u("Pick one: A) car B) apple"), a("B"), u("And now: A) B) C) -- pick B again"),
                               a("B")]},
    "three_turns_system": {"messages": [
        {"role": "system", "content": "Answer briefly. Ada Lovelace is the answer to name questions. B"},
        u("Which letter? A or B"), a("B"),
        u("Who wrote the first program? Ada Lovelace or Babbage?"), a("Ada Lovelace"),
        u("Répète : « héllo 中文 🙂 »"), a("  héllo 中文 🙂  \n")]},
    "whitespace": {"messages": [u("  say hi  \n"), a("\n  Hello there.  \n")]},
}
# Reasoning and tools, for the templates that render them.
REASONING = {
    "reasoning_history": {"messages": [
        u("Which is a fruit? A) car B) apple"), a("B", reasoning_content="Apple is a fruit, so B."),
        u("And which is a vehicle?"), a("A", reasoning_content="A car is a vehicle: A.")]},
    "no_thinking": {"chat_template_kwargs": {"enable_thinking": False}, "messages": [
        u("Which is a fruit? A) car B) apple"), a("B"), u("A vehicle?"), a("A")]},
    "think_in_content": {"messages": [
        u("2+2?"), a("<think>\nadd them\n</think>\n\n4"), u("3+3?"), a("<think>\nagain\n</think>\n\n6")]},
}
TOOLS = {
    "tools": {"tools": [WEATHER], "messages": [
        u("Weather in Paris?"), {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call0ABCD", "name": "get_weather", "content": "22C, sunny"},
        a("It is 22C and sunny in Paris.")]},
}
TOOL_TEMPLATES = ("qwen2.5-7b-instruct", "qwen3-0.6b", "llama-3.1-8b-instruct", "llama-3.2-3b-instruct",
                  "mistral-7b-instruct-v0.3")
REASONING_TEMPLATES = ("qwen3-0.6b", "deepseek-r1-distill-qwen-32b")


def cases() -> list[tuple[str, str]]:
    out = [(t, c) for t in TEMPLATES for c in CONVERSATIONS]
    out += [(t, c) for t in REASONING_TEMPLATES for c in REASONING]
    out += [(t, c) for t in TOOL_TEMPLATES for c in TOOLS]
    return out


def record(conv: str) -> dict:
    return {**CONVERSATIONS, **REASONING, **TOOLS}[conv]
