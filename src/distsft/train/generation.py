"""Sample completions for a few fixed prompts every `logging.generation_steps`, to see what the model
learns, not only how its loss moves.

Every rank generates: under DeepSpeed ZeRO-3 and FSDP2 each rank holds a slice of the weights and a
forward is a collective, so all ranks must run the same number of forwards (`synced_gpus`), even when a
rank's sequences all end early. Rank 0 writes the record. Generation runs under the training autocast
(fp32 master weights must reach flash-attn in bf16) and outside the throughput clock.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from transformers import GenerationConfig, TrainerCallback

from distsft.data.chat import ChatRenderer, resolve_chat_template
from distsft.data.encode import OffsetEncoder
from distsft.runtime import dist


def synced_gpus(model: Any) -> bool:
    """Whether generate must keep every rank stepping until all are done. Passing ZeRO-3's flag alone (as
    distsft did) overrode transformers' own detection with False under FSDP2 -- and that detection looks
    for the attribute transformers' apply_fsdp2 sets, which accelerate's fully_shard does not: a rank whose
    prompts finished first would leave the others waiting in an all-gather, for ever."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    if dist.env().world_size <= 1:
        return False
    from torch.distributed.fsdp import FSDPModule
    return is_deepspeed_zero3_enabled() or any(isinstance(m, FSDPModule) for m in model.modules())


class SampleGenerations(TrainerCallback):
    def __init__(self, spec: Any, tokenizer: Any, writer: Any = None,
                 pause: Callable[[], ContextManager[Any]] = nullcontext,
                 autocast: Callable[[], ContextManager[Any]] = nullcontext):
        """`writer` is the rank-0 metrics writer (None on other ranks); `pause` keeps generation out of
        the throughput clock (step_sync.StepWindow.paused); `autocast` is the training's."""
        self.pause, self.autocast = pause, autocast
        self.every = spec.logging.generation_steps
        self.prompts = list(spec.logging.generation_prompts)
        self.max_new_tokens = spec.logging.generation_max_new_tokens
        self.tokenizer, self.writer = tokenizer, writer
        # Prompts are rendered exactly as training renders conversations (same template, system prompt
        # and BOS handling), so the completions show what the model does on its training format.
        renderer = ChatRenderer(tokenizer, resolve_chat_template(tokenizer, spec.data.chat_template))
        encoder = OffsetEncoder(tokenizer)
        system = [{"role": "system", "content": spec.data.system_prompt}] if spec.data.system_prompt else []
        self.texts = [encoder.add_bos(renderer.render(system + [{"role": "user", "content": p}],
                                                      add_generation_prompt=True))[0] for p in self.prompts]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.every and self.prompts and model is not None and state.global_step % self.every == 0:
            with self.pause():
                completions = self.generate(model, args.device)
            if self.writer is not None:
                self.writer.write({"step": state.global_step, "generations": [
                    {"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]})

    def generate(self, model: Any, device: torch.device) -> list[str]:
        tok = self.tokenizer
        # Left padding: generation appends after the last position, which must be a real token.
        batch = tok(self.texts, add_special_tokens=False, padding=True, padding_side="left",
                    return_tensors="pt").to(device)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tok.eos_token_id
        # A fresh config: greedy whatever sampling defaults the checkpoint ships with.
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=tok.pad_token_id, eos_token_id=eos, use_cache=True)
        was_training = model.training
        model.eval()  # no dropout; gradient checkpointing is off outside training mode, so the KV cache works
        try:
            with torch.no_grad(), self.autocast():
                out = model.generate(**batch, generation_config=config, synced_gpus=synced_gpus(model))
        finally:
            model.train(was_training)
        return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
