"""Sequence parallelism (DeepSpeed Ulysses through accelerate's ParallelismConfig) with packed examples
kept apart, the same global batch and a token-weighted loss. Runs on every rank.

What the libraries do (accelerate 1.15, transformers 5.24, DeepSpeed 0.19.8), and what distsft adds:

* accelerate's `_prepare_deepspeed` calls `UlyssesSPAttentionHF.register_with_transformers`, which puts a
  wrapper in `ALL_ATTENTION_FUNCTIONS[<attn>]`: each layer's q/k/v go through an all-to-all (sequence
  shards -> head shards), the core attention runs on the whole sequence for a subset of heads, and a
  second all-to-all goes back. The wrapper sets `attention_mask = None` (a 4-D mask at the full length
  is O(L^2)); it all-gathers `position_ids`, so the core sees the whole sequence's positions. With sdpa
  a None mask means plain causal attention: packed examples would attend to each other.
  -> `isolating(core)` wraps the core *before* DeepSpeed wraps it: with no mask it rebuilds the examples
  from the gathered `position_ids` (a new example starts wherever the position does not continue) and
  runs the core once per example, causally (sliding-window layers get their band). That is exactly the
  per-example block mask, without an L x L tensor. flash_attention_2 with one row is left to
  transformers, which turns reset position_ids into varlen attention itself.
* `UlyssesSPDataLoaderAdapter` (installed by HF Trainer) all-gathers one batch from each rank of a group
  and hands the group's ranks one sequence shard of each, in rank order: rank j's k-th loader batch is
  the group's micro-batch k*S + j. It replaces `labels` by pre-shifted `shift_labels`, shards every
  tensor along dim 1 (so no 4-D mask may travel: the collator leaves it out) and needs the length to
  divide by S; over gloo its all-gather also needs one shape for the whole group, so the collator pads
  every row to max_length rounded up to a multiple of S (padding carries label -100).
  -> `group_micro_batches` yields exactly the rows that keep the global sample order of the data-parallel
  run: optimizer step s takes rows order[s*G:(s+1)*G] whatever the layout.
* HF's `deepspeed_sp_compute_loss` weights each micro-batch by its own token count; accumulation and DP
  then average those means. distsft instead divides the group's summed token loss by the tokens of the
  whole global batch (`step_loss_tokens`), so the gradient, like the DP run's, is token-weighted over the
  global batch: `scaled_group_loss`.
* DeepSpeed's wrapper bypasses Ulysses in eval mode when asked (`disable_in_eval`, which accelerate
  asks for); distsft evaluates through it too (a long eval row fits no better than a long train row),
  so `install` registers with `disable_in_eval=False`, and the eval rows are sharded like train rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

FLASH = ("flash_attention_2", "flash_attention_3")
# Keys the Ulysses loader adapter cannot shard (not [B, L]) or the wrapper would drop anyway.
UNSHARDABLE = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "use_cache")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: S ranks (consecutive, as DeepSpeed's parallel_state_sp groups them) share
    one sequence; the groups are the data-parallel replicas."""
    world_size: int
    rank: int
    sp_size: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


# ------------------------------------------------------------------ attention


def example_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)) of each example in one row: a new one starts wherever the position does not
    continue the previous one (the collator restarts positions at 0 for every example and for padding)."""
    pos = position_ids.reshape(-1)
    n = int(pos.shape[0])
    if n == 0:
        return []
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten().add_(1).tolist()
    starts = [0, *breaks]
    return list(zip(starts, [*breaks, n]))


def _band(n: int, window: int, device: torch.device) -> torch.Tensor:
    """Causal mask limited to the last `window` keys (transformers' sliding_window_overlay: q - k < w)."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return ((d >= 0) & (d < window))[None, None]


def isolating(core: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The core attention, with packed examples kept apart when it gets no mask but whole-sequence
    position_ids (what DeepSpeed's Ulysses wrapper passes after its all-to-all). With a mask, or without
    position_ids, it is the core unchanged."""

    @functools.wraps(core)
    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        pos = kwargs.get("position_ids")
        if attention_mask is not None or pos is None or query.shape[2] != pos.shape[-1]:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        batch = query.shape[0]
        if name in FLASH and batch == 1:
            return core(module, query, key, value, None, *args, **kwargs)  # varlen from position_ids
        pos = pos.expand(batch, -1) if pos.shape[0] == 1 else pos
        # The layer's own window (transformers passes it per layer; None on full-attention layers).
        window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
        rows = []
        for b in range(batch):
            pieces = []
            for s, e in example_spans(pos[b]):
                part = {**kwargs, "position_ids": pos[b:b + 1, s:e]}
                mask = _band(e - s, int(window), query.device) if window and e - s > int(window) else None
                out, _ = core(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                              mask, *args, **part)
                pieces.append(out)  # [1, n, heads, head_dim]
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0), None

    attention.distsft_isolating = True  # type: ignore[attr-defined]
    return attention


def install() -> None:
    """Make DeepSpeed's Ulysses registration (called by accelerate when it prepares the model) wrap the
    isolating core, and keep Ulysses on in eval. Call once per process, before the Trainer is built."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    if getattr(UlyssesSPAttentionHF.register_with_transformers, "distsft", False):
        return
    original = UlyssesSPAttentionHF.register_with_transformers

    def register(model_name_or_path: Any, core_attn_implementation: str, sequence_parallel_size: int,
                 micro_batch_size: int, seq_length: int | None = None, seq_length_is_variable: bool = True,
                 disable_in_eval: bool = False) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        core = ALL_ATTENTION_FUNCTIONS[core_attn_implementation]
        if not getattr(core, "distsft_isolating", False):
            ALL_ATTENTION_FUNCTIONS[core_attn_implementation] = isolating(core, core_attn_implementation)
        return original(model_name_or_path=model_name_or_path, core_attn_implementation=core_attn_implementation,
                        sequence_parallel_size=sequence_parallel_size, micro_batch_size=micro_batch_size,
                        seq_length=seq_length, seq_length_is_variable=seq_length_is_variable,
                        disable_in_eval=False)

    register.distsft = True  # type: ignore[attr-defined]
    UlyssesSPAttentionHF.register_with_transformers = staticmethod(register)


def parallelism_config(sp_size: int, attn: str) -> Any:
    """accelerate's ParallelismConfig for Ulysses (what `sp_size`/`sp_backend: deepspeed` in an
    accelerate file become), given to TrainingArguments so that ranks started without `accelerate
    launch` (SLURM, torchrun) get it too. Variable lengths: each micro-batch is as long as its rows."""
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig
    install()
    handler = DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attn)
    return ParallelismConfig(sp_size=sp_size, sp_backend="deepspeed", sp_handler=handler)


# ------------------------------------------------------------------ data


def group_micro_batches(step_blocks: Callable[[int], list[list[int]]], accum: int, layout: Layout,
                        start_step: int, total_steps: int) -> Iterator[list[int]]:
    """This rank's loader batches. The group works through its micro-batches u = step*accum + m in
    order (block m of the step for this data-parallel replica, `step_blocks(step)[m]`); the Ulysses
    adapter takes loader batch k of group rank j as micro-batch k*S + j, so this rank yields u = start,
    start+S, ... shifted by its group rank. When the steps do not fill the last round of S, the round
    is completed with the next step's blocks, which the adapter loads but the trainer never trains on
    (it stops at total_steps), so no rank of the group waits for a batch that never comes."""
    S = layout.sp_size
    first, last = start_step * accum, total_steps * accum
    rounds = -(-(last - first) // S)
    for k in range(rounds):
        step, m = divmod(first + k * S + layout.sp_rank, accum)
        yield step_blocks(step)[m]


class GroupBatchSampler:
    """The batch sampler of one rank of a sequence-parallel group (see `group_micro_batches`): the
    data-parallel split of `data.sampler` over the groups, then the group's micro-batches dealt out to
    its ranks in the order the Ulysses adapter takes them back. The start step is read when iteration
    begins (after a resume has restored it), as `data.sampler.StepBatchSampler` does."""

    def __init__(self, order: Any, micro: int, accum: int, layout: Layout, total_steps: int,
                 start_step: Callable[[], int]):
        self.order, self.micro, self.accum, self.layout = order, micro, accum, layout
        self.total_steps, self.start_step = total_steps, start_step

    def __len__(self) -> int:
        return -(-self.total_steps * self.accum // self.layout.sp_size)

    def __iter__(self) -> Iterator[list[int]]:
        from ..data.sampler import split_step
        cached: dict[int, list[list[int]]] = {}

        def blocks(step: int) -> list[list[int]]:
            if step not in cached:
                cached.clear()
                cached[step] = split_step(self.order.step_rows(step), self.micro, self.accum,
                                          self.layout.dp_size, self.layout.dp_rank)
            return cached[step]

        yield from group_micro_batches(blocks, self.accum, self.layout, self.start_step(), self.total_steps)


def strip_for_ulysses(batch: dict[str, Any]) -> dict[str, Any]:
    """A collated batch as the Ulysses adapter can shard it: [B, L] tensors only (the isolation comes
    from position_ids, rebuilt in the attention)."""
    for k in UNSHARDABLE:
        batch.pop(k, None)
    return batch


def shard_rows(batch: dict[str, Any], labels: torch.Tensor, layout: Layout) -> tuple[dict[str, Any], torch.Tensor]:
    """One eval batch as this rank of its group sees it (what the adapter does to train batches): the
    labels shifted over the whole row first, then this rank's slice of every [B, L] tensor. Returns
    (model inputs, shifted labels of the slice)."""
    S, j = layout.sp_size, layout.sp_rank
    width = labels.shape[1]
    if width % S:
        raise ValueError(f"row length {width} is not a multiple of sequence_parallel_size {S} "
                         "(the collator pads to one)")
    chunk = width // S
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    part = slice(j * chunk, (j + 1) * chunk)
    out = {k: v[:, part] for k, v in strip_for_ulysses(dict(batch)).items()
           if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == width}
    return out, shifted[:, part].contiguous()


def fill_rows(rows: list[int], micro: int) -> tuple[list[int], int]:
    """Eval rows padded to exactly `micro` (Ulysses' attention is built for one batch size): (rows, how
    many are real). The filler repeats the first row, and its tokens are given no weight."""
    real = len(rows)
    base = rows or [0]
    return (base + [base[0]] * (micro - real))[:max(micro, real)], real


def eval_batches(ds: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], micro: int,
                 layout: Layout) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """This rank's eval batches under sequence parallelism: the rows of its data-parallel group (every
    rank of the group the same rows, so the same shapes), filled to `micro` rows with weightless copies,
    each sharded along the sequence like a training batch. Yields (model inputs, shifted labels)."""
    from ..data.sampler import eval_shards
    for rows in eval_shards(len(ds), micro, layout.dp_size, layout.dp_rank):
        filled, real = fill_rows(rows, micro)
        batch = collate([ds[i] for i in filled])
        for k in ("num_real_tokens", "batch_checksum"):
            batch.pop(k, None)
        labels = batch.pop("labels").clone()
        labels[real:] = -100
        yield shard_rows(batch, labels, layout)


# ------------------------------------------------------------------ loss


def step_loss_tokens(batches: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """Loss tokens of one optimizer step over the whole world: every rank holds one shard of each of its
    group's micro-batches (pre-shifted labels), so the world's sum counts each label once."""
    import torch.distributed as tdist
    n = sum(int((b["shift_labels"] != -100).sum()) for b in batches)
    t = torch.tensor(float(n), dtype=torch.float64, device=device)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t)
    return t


def shard_token_loss(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over this rank's sequence shard, its loss tokens). The adapter's
    pre-shifted labels pair every position of the shard with its next token, across shard borders."""
    shift = inputs.pop("shift_labels")
    inputs.pop("labels", None)
    logits = model(**{**inputs, "use_cache": False}).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             shift.reshape(-1).to(logits.device), ignore_index=-100,
                                             reduction="sum")
    return loss, int((shift != -100).sum())


class _GroupSum(torch.autograd.Function):
    """Sum over the group, differentiably: every rank's output depends on every rank's input with weight
    1, so each input's gradient is the sum of the outputs' gradients (an all-reduce both ways; what
    torch.distributed.nn's all_gather + sum computes, without its deprecation warning per micro-step)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as tdist
        ctx.group = group
        out = value.detach().clone()
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as tdist
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, group=ctx.group)
        return grad, None


def scaled_group_loss(local_sum: torch.Tensor, step_tokens: torch.Tensor, group: Any, dp_size: int) -> torch.Tensor:
    """The loss each rank back-propagates so that the optimizer sees d(sum of all token losses of the
    global batch) / (its loss tokens), like the data-parallel run. The group's shards are summed with a
    differentiable all-gather (its backward sums the S ranks' gradients into each shard); DeepSpeed then
    averages gradients over all world ranks (dp_size x S): hence x dp_size. Accumulation is not divided
    out again (the trainer is told the loss is already scaled for it)."""
    group_sum = _GroupSum.apply(local_sum, group)
    return group_sum * dp_size / step_tokens.to(group_sum.dtype).clamp(min=1)


def train_loss(model: Any, inputs: dict[str, Any], step_tokens: torch.Tensor,
               layout: Layout) -> tuple[torch.Tensor, float, int]:
    """One micro-batch shard: (the loss to back-propagate, this shard's summed token loss, its tokens)."""
    local_sum, count = shard_token_loss(model, inputs)
    loss = scaled_group_loss(local_sum, step_tokens, sp_group(), layout.dp_size)
    return loss, float(local_sum.detach()), count


def sp_group() -> Any:
    """DeepSpeed's sequence-parallel process group of this rank (set up by the Ulysses registration)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    return parallel_state_sp.get_sequence_parallel_group()
