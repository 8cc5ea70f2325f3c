"""Training options end to end on the tiny model: an 8-bit optimizer and Adafactor resume exactly and log
the planned learning rate; new special tokens train with LoRA and reload; the run name reaches the outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import helpers as h

pytestmark = pytest.mark.slow
STEPS = 8

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
            "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}"
            "{{ '<|user|>\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
NEW = ["<|assistant|>", "<|user|>"]


def _steps(out):
    return {m["step"]: m for m in h.metrics(out) if "loss" in m}


def _planned_lr(out):
    from distsft.plan.batch import warmup_steps
    from distsft.observe.plots import lr_schedule
    from distsft.config.spec import load_spec
    spec = load_spec(out / "run.yaml")
    return lr_schedule(spec, STEPS, warmup_steps(STEPS, spec.train.warmup_ratio))


@pytest.mark.parametrize("optim, schedule, gpus", [
    ("adamw_8bit", ["train.lr_scheduler_type=cosine_with_min_lr", "train.min_lr_ratio=0.2"], "2"),
    ("adafactor", ["train.lr_scheduler_type=warmup_stable_decay", "train.decay_ratio=0.25"], "1"),
])
def test_optimizer_state_resumes_exactly_and_the_logged_lr_is_the_planned_one(tmp_path, optim, schedule, gpus):
    args = ["--gpus", gpus, f"train.max_steps={STEPS}", f"train.optim={optim}", "checkpoint.save_steps=4",
            "train.adam_beta2=0.98", *schedule]
    straight = tmp_path / "straight"
    h.run("run", h.write_spec(tmp_path / "a.yaml", straight), *args, check=True)
    ref = _steps(straight)
    assert sorted(ref) == list(range(1, STEPS + 1))
    # The learning rate logged at each step is the plan's curve (lr_schedule.png), exactly.
    planned = _planned_lr(straight)
    assert [ref[s]["learning_rate"] for s in range(1, STEPS + 1)] == pytest.approx(planned, rel=1e-9, abs=1e-12)
    assert json.loads((straight / "run_record.jsonl").read_text().splitlines()[-1])["optim"] == optim

    # The optimizer's own state is in the checkpoint: bitsandbytes' 8-bit moments, Adafactor's factored ones.
    state = torch.load(straight / "checkpoint-4" / "optimizer.pt", weights_only=False)["state"]
    if optim == "adamw_8bit":
        quant = [s["__bnb_optimizer_quant_state__"] for s in state.values() if "__bnb_optimizer_quant_state__" in s]
        assert any(q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quant)
    else:
        assert any("exp_avg_sq_row" in s for s in state.values())

    # Resume from checkpoint-4 (what a preempted job finds) and continue: the same losses as the straight run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    p = h.run("run", h.write_spec(tmp_path / "b.yaml", resumed), *args, check=True)
    assert "resuming from checkpoint-4" in p.stdout
    got = _steps(resumed)
    assert sorted(got) == list(range(5, STEPS + 1))
    for s, m in got.items():
        assert m["batch_checksum"] == ref[s]["batch_checksum"], s
        assert m["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), (s, m["loss"], ref[s]["loss"])
        assert m["learning_rate"] == pytest.approx(ref[s]["learning_rate"], rel=1e-9)
    assert "mfu" not in got[STEPS]  # CPU: no peak FLOP/s to compare with


def _eval_loss(model, spec, tok) -> float:
    """Token-weighted eval loss of `model` over the eval split, one example at a time."""
    from distsft.data import build as data
    from distsft.data.split import cache_root
    ds, _ = data.load_or_build(spec, tok, "eval", cache_root(spec))
    total, count = h.packed_token_loss(model, ds)
    return total / count


def test_new_special_tokens_train_with_lora_save_and_reload(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    out = tmp_path / "run"
    spec_file = h.write_spec(tmp_path / "spec.yaml", out)
    common = [f"data.chat_template={template}", "peft.method=lora", "peft.use_rslora=true", "peft.use_dora=true"]
    # Without the tokens, the plan names the markers and the key that fixes it.
    plan = h.run("plan", spec_file, "--no-data", *common, check=True)
    assert "<|assistant|>, <|user|>" in plan.stdout and "model.add_special_tokens" in plan.stdout

    h.run("run", spec_file, "--gpus", "2", *common, f"model.add_special_tokens=[{', '.join(NEW)}]",
          f"train.max_steps={STEPS}", f"train.eval_steps={STEPS}", "checkpoint.save_merged=true",
          "logging.run_name=tokens-1", "logging.report_to=[tensorboard]", check=True)
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from distsft.train import tokens as tokens_lib
    from distsft.config.spec import load_spec

    # The new rows trained: input and output rows moved away from their mean initialisation.
    base = AutoModelForCausalLM.from_pretrained(h.TINY)
    adapter = load_file(out / "adapter_model.safetensors")
    for layer, weight in (("embed_tokens", base.get_input_embeddings().weight),
                          ("lm_head", base.get_output_embeddings().weight)):
        (key,) = [k for k in adapter if layer in k and "trainable_tokens_delta" in k]
        rows = adapter[key]
        assert rows.shape == (2, weight.shape[1])
        moved = (rows - weight.mean(0)).abs().amax(1)
        assert (moved > 1e-3).all(), (layer, moved)

    # The saved tokenizer has the tokens; the adapter reloads onto the resized base; the reloaded model is the
    # trained one (its eval loss is the one logged at the last step), and so is merged/.
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 514 and tok.convert_tokens_to_ids(NEW) == [512, 513]
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.config.vocab_size == 514
    spec = load_spec(out / "run.yaml")
    logged = [m["eval_loss"] for m in h.metrics(out) if "eval_loss" in m][-1]
    assert _eval_loss(reloaded, spec, tokens_lib.load_tokenizer(spec)) == pytest.approx(logged, abs=1e-4)
    ids = torch.tensor([tok.encode("<|user|>\nhello<|im_end|>\n<|assistant|>\n", add_special_tokens=False)])
    assert 512 in ids and 513 in ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)

    # The run name: TensorBoard subdirectory and run record.
    assert list((out / "tensorboard" / "tokens-1").glob("events.out.tfevents.*"))
    assert json.loads((out / "run_record.jsonl").read_text().splitlines()[-1])["run_name"] == "tokens-1"


def test_liger_on_a_machine_without_cuda_exits_2_before_any_rank(tmp_path):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    p = h.run("run", spec, "--gpus", "2", "model.use_liger_kernel=true")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "model.use_liger_kernel: true needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr
    assert "launching" not in p.stdout and not (out / "metrics.jsonl").exists()  # no rank started
    plan = h.run("plan", spec, "--no-data", "model.use_liger_kernel=true", check=True)  # a login node may plan
    assert "use_liger_kernel needs CUDA" in plan.stdout
