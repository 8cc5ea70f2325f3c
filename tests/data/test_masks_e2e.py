"""Eval loss at learning rate 0 through `distsft run` (2 CPU processes over gloo) equals a reference
computed one conversation at a time with transformers' own assistant mask, on Mistral-7B-Instruct-v0.3's
real template (system message moved into the last user turn, a space before each answer, answers that
also appear in the prompt): the hard case for locating the spans without markers."""

from __future__ import annotations

import json

import pytest
import torch

import helpers as h
from real_templates import CONVERSATIONS, TOOLS, template_path, tokenizer

pytestmark = pytest.mark.slow
NAME = "mistral-7b-instruct-v0.3"


def _model_dir(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tokenizer(NAME)
    tok.chat_template = template_path(NAME).read_text()  # the original: no generation markers
    tok.save_pretrained(path)
    tok.chat_template = None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer(NAME)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _reference(model_dir, records) -> float:
    from transformers import AutoModelForCausalLM
    tok = tokenizer(NAME)
    marked = template_path(NAME, marked=True).read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for rec in records:
        out = tok.apply_chat_template(rec["messages"], chat_template=marked, tools=rec.get("tools"), tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        ids = torch.tensor(out["input_ids"])[None]
        labels = torch.where(torch.tensor(out["assistant_masks"]) == 1, ids[0], -100)
        with torch.no_grad():
            logits = model(ids).logits.float()[0]
        total += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], reduction="sum", ignore_index=-100))
        count += int((labels[1:] != -100).sum())
    return total / count


def test_eval_loss_at_lr_zero_equals_one_conversation_at_a_time_reference(tmp_path):
    model_dir = _model_dir(tmp_path / "model")
    records = [CONVERSATIONS[c] for c in ("choice", "extract", "two_turns", "three_turns_system", "whitespace")]
    records.append(TOOLS["tools"])
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out).read_text()
    spec = (spec.replace(f"name_or_path: {h.TINY}", f"name_or_path: {model_dir}")
            .replace(f"train_files: {h.TRAIN}", f"train_files: {data}").replace(f"eval_files: {h.EVAL}",
                                                                                   f"eval_files: {data}"))
    (tmp_path / "spec.yaml").write_text(spec)
    h.run("run", tmp_path / "spec.yaml", "--gpus", "2", "train.learning_rate=0", "train.max_steps=1",
          "train.eval_steps=1", "train.per_device_train_batch_size=1", "train.global_batch_size=2", check=True)
    eval_loss = [m["eval_loss"] for m in h.metrics(out) if "eval_loss" in m][-1]
    assert eval_loss == pytest.approx(_reference(model_dir, records), rel=1e-5)
