"""One rank of tests/test_fsdp_memory_e2e.py (started by torchrun): HF's Trainer under FSDP2 on CPU, with
the plugin settings, model loading and final save distsft uses, recording what the test checks.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py SPEC OUT

Each rank writes OUT/rank<R>.json: whether sharded gradients existed after the first micro-batch
(sync_each_batch reduce-scatters every micro-batch; HF's no_sync would keep them unsharded, leaving the
sharded .grad empty), the reduce dtype of FSDP2's policy, whether the prepared parameters equal the
checkpoint's (rank 1 never reads it: safetensors' reader raises there), and the final save's dtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    spec_path, out = sys.argv[1], Path(sys.argv[2])
    from distsft.config.spec import load_spec
    from distsft.runtime import devices, dist
    from distsft.train import fsdp, model as model_lib
    spec = load_spec(spec_path)
    devices.setup_rank("fsdp")
    dist.init_early(False)
    e = dist.env()
    fsdp.allow_cpu_fsdp()
    if e.rank != 0:
        import transformers.modeling_utils as mu

        def refuse(*a, **k):  # the contract: only rank 0 reads the weights
            raise AssertionError(f"rank {e.rank} opened the checkpoint")
        mu.safe_open = refuse
    from transformers import Trainer, TrainerCallback, TrainingArguments
    acc = fsdp.accelerator_config(spec, 2)
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, bf16=True,
                             use_cpu=True, ddp_backend="gloo", fsdp=True,
                             fsdp_config=fsdp.trainer_fsdp_config(spec, []), report_to="none",
                             save_strategy="no", logging_steps=1, disable_tqdm=True,
                             **({"accelerator_config": acc} if acc else {}))
    model = model_lib.load_model(spec, "bf16", "sdpa", torch.device("cpu"))
    fsdp.wrap_layers_of(args, model, "bf16")
    result: dict = {"rank": e.rank}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            # Right after prepare: the full parameters, gathered, against the checkpoint's (rank 0 reads it).
            full = {k: v.full_tensor().float() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")}
            if e.rank == 0:
                from safetensors.torch import load_file
                ref = load_file(str(Path(spec.model.name_or_path) / "model.safetensors"))
                result["loaded_equal"] = all(torch.equal(full[k], ref[k].float()) for k in ref if k in full)
                result["compared"] = sum(k in full for k in ref)
            result["buffers"] = {k: float(v.float().sum()) for k, v in model.named_buffers()}

        def on_substep_end(self, args, state, control, model=None, **kw):
            if "sharded_grads_after_first_micro_batch" not in result:
                result["sharded_grads_after_first_micro_batch"] = all(
                    p.grad is not None for p in model.parameters() if p.requires_grad)

    ds = [{"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
          for ids in torch.randint(3, 500, (16, 32), generator=torch.Generator().manual_seed(0))]
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Probe()])
    trainer.train()
    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    result["reduce_dtype"] = str(policy.reduce_dtype)
    full = {k: v.full_tensor() for k, v in trainer.model.state_dict().items() if hasattr(v, "full_tensor")}
    fsdp.save_consolidated(trainer, str(out / "final"), "bf16")
    if e.rank == 0:
        from safetensors.torch import load_file
        saved = load_file(str(out / "final" / "model.safetensors"))
        result["saved_dtypes"] = sorted({str(t.dtype) for t in saved.values()})
        result["saved_equal"] = all(torch.equal(saved[k], full[k].to(torch.bfloat16)) for k in full if k in saved)
        result["config_dtype"] = json.loads((out / "final" / "config.json").read_text())["dtype"]
    (out / f"rank{e.rank}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
