"""The token a fine-tuned model stops on (train.stops): `plan` warns once when the chat template ends
assistant turns with a token that is not the eos, and the model's generation_config carries it (a real
run's saves: tests/test_train_e2e.py, the LoRA run)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import helpers as h
from distsft.cli import app
from distsft.config.spec import validate
from distsft.train import stops
from distsft.train.tokens import load_tokenizer

TEMPLATE = h.TURN_END_TEMPLATE


def _spec(tiny, template=TEMPLATE):
    return validate({"model": {"name_or_path": str(tiny)},
                     "data": {"train_files": ["t.jsonl"], **({"chat_template": template} if template else {})}})


def test_plan_says_it_once_and_names_what_generation_config_will_carry(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTSFT_CACHE_DIR", str(h.ROOT / ".pytest-data-cache"))
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out")
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    r = CliRunner().invoke(app, ["plan", str(spec), "--json", "--no-data", f"data.chat_template={tmp_path / 't.jinja'}"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    tok = load_tokenizer(_spec(h.TINY))
    eos_id = tok.convert_tokens_to_ids("<|eos|>")
    said = [w for w in json.loads(r.stdout)["warnings"] if "ends assistant turns" in w]
    assert len(said) == 1, said
    assert f"<|eos|> (id {eos_id})" in said[0] and f"eos_token_id [{tok.eos_token_id}, {eos_id}]" in said[0]
    # The tokenizer's own template ends turns with its eos: nothing to say.
    r = CliRunner().invoke(app, ["plan", str(spec), "--json", "--no-data"], catch_exceptions=False)
    assert not [w for w in json.loads(r.stdout)["warnings"] if "ends assistant turns" in w]


def test_the_saved_generation_config_carries_the_end_of_turn_token(tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig
    spec = _spec(h.TINY)
    tok = load_tokenizer(spec)
    model = AutoModelForCausalLM.from_pretrained(h.TINY)
    before = model.generation_config.eos_token_id
    eos_id = tok.convert_tokens_to_ids("<|eos|>")
    assert stops.sanity_results(spec)[0][0] == "WARN"
    assert stops.carry_turn_end(model, tok, spec) == [before, eos_id]
    model.save_pretrained(tmp_path / "full")
    assert GenerationConfig.from_pretrained(tmp_path / "full").eos_token_id == [before, eos_id]
    (tmp_path / "adapter").mkdir()  # an adapter directory: its save writes no generation_config itself
    stops.write_generation_config(model, tmp_path / "adapter", tmp_path / "missing")
    assert GenerationConfig.from_pretrained(tmp_path / "adapter").eos_token_id == [before, eos_id]
    assert not (tmp_path / "missing").exists()
    # Nothing changes where the template already ends turns with the eos.
    model = AutoModelForCausalLM.from_pretrained(h.TINY)
    assert stops.carry_turn_end(model, tok, _spec(h.TINY, template=None)) is None
    assert model.generation_config.eos_token_id == before and stops.sanity_results(_spec(h.TINY, None)) == []
