"""LoRA and QLoRA with sharded weights, FSDP2 and DeepSpeed ZeRO-3, end to end on 2 CPU processes over
gloo (bitsandbytes 4-bit runs on CPU, so nothing here needs a GPU).

The HF stack is known to save empty adapters under ZeRO-3 (trl#4416, peft#2892, DeepSpeed#7900): each
run's saved adapter must hold every LoRA matrix, be trained (LoRA's B starts at zero), and, loaded onto
the base model in this process, give the eval loss the sharded run reported. The intermediate
checkpoint (step 2) is sharded only; its save time is in metrics.jsonl.
"""

from __future__ import annotations

import pytest
import torch

import helpers as h

pytestmark = pytest.mark.slow

BACKENDS = {"fsdp": "distributed:\n  backend: fsdp\n",
            "zero3": "distributed:\n  backend: deepspeed\n  zero_stage: 3\n"}


def _reloaded_eval_loss(out, method):
    """Token-weighted eval loss of base + saved adapter, one process, no distsft trainer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from distsft.data import build as data
    from distsft.train import tokens as tokens_lib
    from distsft.data.split import cache_root
    from distsft.config.spec import load_spec
    spec = load_spec(out / "run.yaml")
    tok = tokens_lib.load_tokenizer(spec)
    ds, _ = data.load_or_build(spec, tok, "eval", cache_root(spec))
    kwargs = {"dtype": torch.float32}
    if method == "qlora":  # as the run loaded it (model.load_model, sharded)
        kwargs = {"dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(h.TINY, **kwargs), out).eval()
    return h.packed_eval_loss(model, ds, tok.pad_token_id)


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sharded_adapter_is_saved_trained_and_reloads_with_the_same_eval_loss(tmp_path, backend, method):
    from safetensors.torch import load_file
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out, BACKENDS[backend])
    merged = backend == "fsdp" and method == "lora"
    # activation checkpointing on (FSDP's own under fsdp, HF's under ZeRO-3), as large models train
    h.run("run", spec, "--gpus", "2", f"peft.method={method}", "peft.r=8", "train.max_steps=3",
          "train.gradient_checkpointing=true",
          "train.learning_rate=1e-2", "train.eval_steps=3", "checkpoint.save_steps=2",
          "slurm.signal_delay_s=0", f"checkpoint.save_merged={str(merged).lower()}", check=True, timeout=400)
    losses = h.train_losses(out)
    assert sorted(losses) == [1, 2, 3]

    adapter = load_file(out / "adapter_model.safetensors")
    a = [k for k in adapter if "lora_A" in k]
    b = [k for k in adapter if "lora_B" in k]
    # all-linear on the tiny Llama: q, k, v, o, gate, up, down in each of its 2 layers
    assert len(a) == len(b) == 14, sorted(adapter)
    assert all(adapter[k].numel() > 0 for k in adapter)
    assert all(adapter[k].abs().sum() > 0 for k in b)  # B starts at zero: trained, not the initialisation

    reported = [m["eval_loss"] for m in h.metrics(out) if "eval_loss" in m][-1]
    tol = 1e-4 if method == "lora" else 2e-2  # QLoRA: bf16 compute, summed in another order
    assert _reloaded_eval_loss(out, method) == pytest.approx(reported, abs=tol)

    if merged:
        from transformers import AutoModelForCausalLM
        full = AutoModelForCausalLM.from_pretrained(out / "merged")
        assert not any("lora_" in n for n, _ in full.named_parameters())

    # the intermediate checkpoint: sharded state only, nothing gathered into a model/adapter file
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert not {"model.safetensors", "adapter_model.safetensors"} & names, names
    assert ("global_step2" in names) if backend == "zero3" else ("pytorch_model_fsdp_0" in names), names
    if backend == "fsdp":  # the DCP shards hold the adapter (what a resume loads), not an empty state
        from torch.distributed.checkpoint import FileSystemReader
        keys = FileSystemReader(str(out / "checkpoint-2" / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
        assert sum("lora_B" in k for k in keys) == 14, sorted(keys)
    saves = [m for m in h.metrics(out) if "save_seconds" in m]
    assert [m["step"] for m in saves] == [2, 3] and all(m["save_seconds"] > 0 for m in saves)
    warnings = [m["warning"] for m in h.metrics(out) if "signal_delay_s" in m.get("warning", "")]
    assert len(warnings) == 1 and "Set slurm.signal_delay_s=" in warnings[0]  # once, with the value to set
