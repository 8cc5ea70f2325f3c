"""New special tokens and PEFT options on the real tiny model: rows made and trained, markers checked."""

from __future__ import annotations

import pytest
import torch

from distsft.train import model as model_lib, tokens
from distsft.config.spec import validate

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
            "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
            "{{ '<|user|>\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}")
NEW = ["<|assistant|>", "<|user|>"]


def _spec(tiny, peft=None, **model):
    return validate({"model": {"name_or_path": str(tiny), **model},
                     "data": {"train_files": ["t.jsonl"], "chat_template": TEMPLATE}, "peft": peft or {}})


def test_template_markers_missing_from_the_vocabulary_are_named_with_the_fix(tiny_model_dir):
    spec = _spec(tiny_model_dir)
    tok = tokens.load_tokenizer(spec)
    assert tokens.template_markers(TEMPLATE) == ["<|assistant|>", "<|im_end|>", "<|user|>"]
    assert tokens.missing_template_tokens(tok, TEMPLATE) == NEW  # <|im_end|> is a token of tiny-llama
    msg = tokens.missing_tokens_message(spec, tok)
    assert "<|assistant|>, <|user|>" in msg and "model.add_special_tokens" in msg and "trl#1668" in msg
    assert tokens.plan_warnings(spec) == [msg]
    assert tokens.sanity_results(spec)[0][0] == "WARN"
    fixed = _spec(tiny_model_dir, add_special_tokens=NEW)
    assert tokens.missing_tokens_message(fixed, tokens.load_tokenizer(fixed)) is None
    assert tokens.sanity_results(fixed)[0][0] == "PASS"
    # The tokenizer's own template (ChatML with tokens it has) is fine.
    own = validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train_files": ["t.jsonl"]}})
    assert tokens.plan_warnings(own) == []


def test_full_fine_tuning_resizes_and_mean_initialises_only_the_new_rows(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = _spec(tiny_model_dir, add_special_tokens=NEW + ["<|im_start|>"])  # <|im_start|> exists already
    tok = tokens.load_tokenizer(spec)
    assert len(tok) == 514 and tok.convert_tokens_to_ids(NEW) == [512, 513]
    assert tokens.new_token_ids(tok) == [512, 513]
    m = model_lib.load_model(spec, "no", "sdpa", torch.device("cpu"), tokenizer=tok)
    for new_w, old_w in ((m.get_input_embeddings().weight, base.get_input_embeddings().weight),
                         (m.get_output_embeddings().weight, base.get_output_embeddings().weight)):
        assert new_w.shape[0] == 576  # 514 tokens, the vocabulary padded to a multiple of 64 (issue 19)
        torch.testing.assert_close(new_w[:512], old_w)  # <|im_start|>'s trained row is kept
        for i in (512, 513, 575):  # the new tokens and the padding rows
            torch.testing.assert_close(new_w[i], old_w.mean(0))
    assert m.config.vocab_size == 576


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_the_new_rows_with_dora_and_rslora(tiny_model_dir, method):
    spec = _spec(tiny_model_dir, peft={"method": method, "use_dora": True, "use_rslora": True, "r": 4,
                                       "lora_alpha": 8, "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
                 add_special_tokens=NEW)
    tok = tokens.load_tokenizer(spec)
    m = model_lib.load_model(spec, "bf16" if method == "qlora" else "no", "sdpa", torch.device("cpu"), tokenizer=tok)
    cfg = m.peft_config["default"]
    assert cfg.use_dora and cfg.use_rslora and cfg.trainable_token_indices == {"embed_tokens": [512, 513],
                                                                               "lm_head": [512, 513]}
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert not any("layers.0.self_attn.q_proj" in n for n in names)  # excluded
    assert any("layers.1.self_attn.q_proj.lora_A" in n for n in names)
    # One backward through a sequence using the new tokens, through the fused LM head TRL's SFTTrainer
    # trains with (it reads lm_head.weight and lm_head.bias): both new rows, input and output, get gradients.
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(m.get_base_model())
    ids = torch.tensor([[1, 513, 40, 41, 4, 512, 42, 513, 43, 512]])
    out = m(input_ids=ids, labels=ids, fused_lm_head=True)
    (-out.log_probs.sum()).backward()
    deltas = {n: p for n, p in m.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2
    for name, p in deltas.items():
        assert p.grad is not None and (p.grad.abs().sum(1) > 0).all(), name  # each new row
    assert m.get_output_embeddings().bias is None


def test_modules_to_save_takes_the_head_and_tokens_keep_the_embedding(tiny_model_dir):
    spec = _spec(tiny_model_dir, peft={"method": "lora", "modules_to_save": ["lm_head"]}, add_special_tokens=NEW)
    m = model_lib.load_model(spec, "no", "sdpa", torch.device("cpu"))
    assert m.peft_config["default"].trainable_token_indices == {"embed_tokens": [512, 513]}
    assert any("lm_head.modules_to_save" in n for n, p in m.named_parameters() if p.requires_grad)


def test_a_peft_name_the_model_lacks_is_a_spec_error(tiny_model_dir):
    from distsft.errors import SpecError
    spec = _spec(tiny_model_dir, peft={"method": "lora", "target_modules": ["no_such_proj"]})
    with pytest.raises(SpecError, match="peft"):
        model_lib.load_model(spec, "no", "sdpa", torch.device("cpu"))


def test_tied_embeddings_train_the_new_rows_once(tiny_model_dir, tmp_path):
    """A tied head (Qwen2.5-0.5B, Llama-3.2-1B, Gemma...): one trainable-token table serves input and output."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "tied")
    spec = _spec(tmp_path / "tied", peft={"method": "lora"}, add_special_tokens=NEW)
    m = model_lib.load_model(spec, "no", "sdpa", torch.device("cpu"))
    assert m.peft_config["default"].trainable_token_indices == {"embed_tokens": [512, 513]}
    add_fused_lm_head(m.get_base_model())
    ids = torch.tensor([[1, 513, 40, 41, 4, 512, 42, 513, 43, 512]])
    (-m(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.sum()).backward()
    (delta,) = [p for n, p in m.named_parameters() if "trainable_tokens_delta" in n]
    assert (delta.grad.abs().sum(1) > 0).all()


def test_marker_shapes():
    gemma = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + "
             "'<end_of_turn>\\n' }}{% endfor %}")
    assert tokens.template_markers(gemma) == ["<start_of_turn>", "<end_of_turn>"]
    deepseek = "{{ '<｜User｜>' + m['content'] + '<｜Assistant｜>' }}"
    assert tokens.template_markers(deepseek) == ["<｜User｜>", "<｜Assistant｜>"]
    # Plain-text conventions are not control tokens: [INST] (Mistral v1), <tools> in tool prompts, <s>.
    assert tokens.template_markers("[INST] {{ x }} [/INST]<tools></tools><s></s>") == []
