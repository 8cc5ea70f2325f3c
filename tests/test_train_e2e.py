"""`distsft run` end to end on CPU: real processes over gloo, real TRL SFTTrainer, real DeepSpeed."""

from __future__ import annotations

import json
import time

import pytest
import torch

import helpers as h

pytestmark = pytest.mark.slow


def test_two_process_run_trains_logs_once_per_step_and_saves_loadable_outputs(tmp_path):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    p = h.run("run", spec, "--gpus", "2", "train.max_steps=12", check=True)
    assert "starting 2 CPU processes over gloo" in p.stdout
    assert "run complete" in p.stdout
    losses = h.train_losses(out)
    assert sorted(losses) == list(range(1, 13))  # each step exactly once
    assert sum(list(losses.values())[-3:]) / 3 < sum(list(losses.values())[:3]) / 3 - 0.3  # it learns
    recs = h.metrics(out)
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second", "epoch"):
        assert all(key in r for r in recs if "loss" in r), key
    record = [json.loads(x) for x in (out / "run_record.jsonl").read_text().splitlines()]
    assert record[-1]["world_size"] == 2 and record[-1]["writer_rank"] == 0
    for name in ("run.yaml", "accelerate.yaml", "model.safetensors", "tokenizer.json"):
        assert (out / name).exists(), name
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model(**tok("hello", return_tensors="pt")).logits.shape[-1] == model.config.vocab_size


def _independent_loss(out, step: int) -> float:
    """Token-weighted mean over the step's global batch, one example at a time, with the untouched model."""
    from distsft.data import build as data
    from distsft.train import tokens as tokens_lib
    from distsft.data.split import cache_root
    from distsft.data.sampler import GlobalOrder
    from distsft.config.spec import load_spec
    spec = load_spec(out / "run.yaml")
    tok = tokens_lib.load_tokenizer(spec)
    ds, stats = data.load_or_build(spec, tok, "train", cache_root(spec))
    rows = GlobalOrder(stats["num_rows"], spec.train.global_batch_size, spec.train.seed).step_rows(step - 1)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(h.TINY, dtype=torch.float32).eval()
    total, count = h.packed_token_loss(model, (ds[r] for r in rows.tolist()))
    return total / count


@pytest.fixture(scope="module")
def lr0_run(tmp_path_factory):
    """One 2-process DDP run that several tests read: learning rate 0 (the weights stay, so every step's
    loss and the eval loss can be recomputed independently), micro-batch 1 (4 micro-batches per rank),
    eval at every step."""
    tmp = tmp_path_factory.mktemp("lr0")
    out = tmp / "run"
    h.run("run", h.write_spec(tmp / "spec.yaml", out), "--gpus", "2", "train.learning_rate=0", "train.max_steps=2",
          "train.per_device_train_batch_size=1", "train.eval_steps=1", check=True)
    return out


def test_logged_loss_is_the_token_weighted_mean_of_the_global_batch(lr0_run):
    losses = h.train_losses(lr0_run)
    for step in (1, 2):
        assert losses[step] == pytest.approx(_independent_loss(lr0_run, step), abs=1e-5)


def _eval_loss(tmp_path, name, *args):
    out = tmp_path / name
    spec = h.write_spec(tmp_path / f"{name}.yaml", out)
    h.run("run", spec, "train.learning_rate=0", "train.max_steps=1", "train.eval_steps=1", *args, check=True)
    return [m["eval_loss"] for m in h.metrics(out) if "eval_loss" in m][-1]


def test_eval_loss_does_not_depend_on_packing_batch_size_or_process_count(tmp_path, lr0_run):
    base = [m["eval_loss"] for m in h.metrics(lr0_run) if "eval_loss" in m][-1]  # packed, 2 processes, batch 1
    assert _eval_loss(tmp_path, "padded2", "--gpus", "2", "data.packing=false") == pytest.approx(base, abs=1e-4)
    assert _eval_loss(tmp_path, "packed1", "--gpus", "1", "train.per_device_eval_batch_size=3") == \
        pytest.approx(base, abs=1e-4)


def test_step_one_loss_agrees_across_ddp_and_deepspeed_zero(tmp_path, lr0_run):
    """Step 1 runs on the untouched model, so its loss is DDP's (micro-batch and learning rate aside)."""
    ds = ["distributed.backend=deepspeed"]
    first = {"ddp": h.train_losses(lr0_run)[1]}
    assert (lr0_run / "model.safetensors").exists()
    # ZeRO-1 is DeepSpeed's ZeRO-2 optimizer without gradient partitioning (test_backend_precision runs it);
    # ZeRO-3's step-1 loss is the one-conversation-at-a-time reference in test_seqpar_e2e (its sp 1 and 2 runs).
    for name, args in {"zero2": ds + ["distributed.zero_stage=2"],
                       "zero2_offload": ds + ["distributed.zero_stage=2", "distributed.offload_optimizer=true"]}.items():
        out = tmp_path / name
        spec = h.write_spec(tmp_path / f"{name}.yaml", out)
        h.run("run", spec, "--gpus", "2", "train.max_steps=2", *args, check=True, timeout=400)
        first[name] = h.train_losses(out)[1]
        assert (out / "model.safetensors").exists() or list(out.glob("model*.safetensors")), name
    for name in ("zero2", "zero2_offload"):
        assert first[name] == pytest.approx(first["ddp"], abs=1e-4), name


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_users_can_launch_the_rendered_run_dir_themselves(tmp_path, launcher):
    import subprocess
    import sys
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    h.run("render", spec, "--gpus", "2", "train.max_steps=3", "--out", out, check=True)
    cmd = {"accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(out / "accelerate.yaml")],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]}[launcher]
    p = subprocess.run([*cmd, str(h.ROOT / "launch" / "train.py"), str(out / "run.yaml")], capture_output=True,
                       text=True, env=h.env(), cwd=h.ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(h.train_losses(out)) == [1, 2, 3]
    assert "world size 2" in p.stdout
    for png in ("lr_schedule.png", "length_histogram.png", "loss_curves.png"):  # rank 0 draws them, not a launcher
        assert (out / png).stat().st_size > 1000, png


def test_lora_with_merged_output_and_qlora_train_and_load(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    out = tmp_path / "lora"
    spec = h.write_spec(tmp_path / "lora.yaml", out)
    # A template whose turns end with a token that is not the eos (train.stops: it must reach every save).
    (tmp_path / "t.jinja").write_text(h.TURN_END_TEMPLATE)
    h.run("run", spec, "--gpus", "2", "peft.method=lora", "peft.r=8", "checkpoint.save_merged=true",
          "train.learning_rate=1e-2", "train.gradient_checkpointing=true",
          f"data.chat_template={tmp_path / 't.jinja'}", check=True)
    losses = list(h.train_losses(out).values())
    assert losses[-1] < losses[0]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(h.TINY), out)
    assert any("lora_" in n for n, _ in model.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(h.TINY)
    for d in (out, out / "merged"):  # the adapter's and the merged model's generation_config
        assert GenerationConfig.from_pretrained(d).eos_token_id == [tok.eos_token_id,
                                                                    tok.convert_tokens_to_ids("<|eos|>")], d

    qout = tmp_path / "qlora"
    spec = h.write_spec(tmp_path / "qlora.yaml", qout)
    h.run("run", spec, "--gpus", "1", "peft.method=qlora", "train.max_steps=3", "train.learning_rate=1e-2",
          check=True)
    assert (qout / "adapter_model.safetensors").exists()
    assert len(h.train_losses(qout)) == 3


def test_bad_input_fails_before_any_rank_starts_with_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "not json\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out")
    t0 = time.time()
    p = h.run("run", spec, "--gpus", "2", f"data.train_files=[{bad}]")
    assert p.returncode == 2, p.stderr
    assert f"{bad}:2" in p.stderr and "Traceback" not in p.stderr
    assert time.time() - t0 < 30
    p = h.run("run", spec, "model.attn_implementation=flash_attention_2")
    assert p.returncode == 2 and "flash_attention_2" in p.stderr
    p = h.run("run", spec, "--gpus", "3", "train.global_batch_size=8")
    assert p.returncode == 2 and "global_batch_size" in p.stderr
