"""Rank entry for benchmarks/sharded_backends.py: `distsft.train.recipe.main` with one added TrainerCallback that
counts this rank's model-state bytes once, just before the optimizer step of step 3 (gradients present,
Adam moments allocated since step 1), and prints them as one `STATE_BYTES {...}` line.

Counted: every distinct tensor storage reachable from the model's parameters (the local shard of an
FSDP2 DTensor, the partition `ds_tensor` of a ZeRO-3 parameter), their gradients, the optimizer's state,
and the tensors DeepSpeed's ZeRO optimizer holds itself (fp32 master partitions, gradient partitions,
bucket buffers). Only the bytes the tensors own: not the allocator's slack, not activations.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from transformers import TrainerCallback

from distsft.runtime import dist
from distsft.train import trainer as trainer_lib

STEP = 3


def _storages(obj: Any, seen: dict[int, int], depth: int = 0) -> None:
    if depth > 3 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        grad = obj.grad  # a DTensor's gradient is a DTensor too (the local tensor has none)
        t = getattr(obj, "_local_tensor", None)  # DTensor: this rank's shard
        t = obj if t is None else t
        if hasattr(t, "ds_tensor"):  # ZeRO-3 parameter: the partition this rank holds
            _storages(t.ds_tensor, seen, depth + 1)
        try:
            s = t.untyped_storage()
            if s.nbytes():
                seen[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        if grad is not None:
            _storages(grad, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _storages(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen, depth + 1)


def model_state_bytes(model: Any, optimizer: Any) -> dict[str, int]:
    params: dict[int, int] = {}
    for p in model.parameters():
        _storages(p, params)
    opt: dict[int, int] = {}
    o = optimizer
    for _ in range(6):  # accelerate / DeepSpeed wrappers around the torch optimizer
        if o is None:
            break
        if hasattr(o, "state") and isinstance(getattr(o, "state"), dict):
            _storages(list(o.state.values()), opt)
        if type(o).__module__.startswith("deepspeed"):
            _storages([v for v in vars(o).values() if isinstance(v, (torch.Tensor, list, tuple))], opt)
        o = getattr(o, "optimizer", None)
    for k in list(opt):
        opt.pop(k) if k in params else None
    return {"params_and_grads": sum(params.values()), "optimizer": sum(opt.values()),
            "total": sum(params.values()) + sum(opt.values())}


class Probe(TrainerCallback):
    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == STEP:
            t = self.trainer
            engine = getattr(t, "deepspeed", None)
            optimizer = engine.optimizer if engine is not None else t.optimizer
            print("STATE_BYTES " + json.dumps({"rank": dist.env().rank,
                                               **model_state_bytes(t.model_wrapped, optimizer)}), flush=True)


_init = trainer_lib.DistSFTTrainer.__init__


def _with_probe(self: Any, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    self.add_callback(Probe(self))


trainer_lib.DistSFTTrainer.__init__ = _with_probe  # type: ignore[method-assign]

if __name__ == "__main__":
    from distsft.train.recipe import main
    sys.exit(main())
