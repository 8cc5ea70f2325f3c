"""New special tokens (`model.add_special_tokens`) and the check that a chat template's markers exist.

A chat template whose markers (`<|im_start|>`, ...) the base tokenizer lacks still "works": each marker
is split into ordinary pieces, and nothing ever learns a token for it (trl#1668). `missing_template_tokens`
finds such markers for `distsft plan` and `distsft sanity`; `model.add_special_tokens` is the fix:
the tokenizer gets the tokens, the embedding (and an untied output head) gets rows for them,
initialised at the mean of the existing rows, and those rows train -- in full fine-tuning like any
weight, with LoRA/QLoRA through PEFT's `trainable_token_indices` (the rows' values are saved in the
adapter, so a reload gives the trained rows whatever the base was initialised with).
"""

from __future__ import annotations

import re
from typing import Any

from distsft.errors import NotReachable, SpecError

# Marker shapes that chat templates use for control tokens: <|...|> (ChatML, Llama-3, Phi, ...), the
# full-width variant <｜...｜> (DeepSeek) and snake_case tags such as <start_of_turn> (Gemma). Not
# [INST] or <tools>: those may legitimately be plain text (Mistral v1, tool-use system prompts).
_MARKER = re.compile(r"<\|[^|<>\s]{1,64}\|>|<｜[^｜<>\s]{1,64}｜>|<[A-Za-z]+(?:_[A-Za-z]+)+>")
KEY = "model.add_special_tokens"


def _hub_id_not_here(name: str) -> bool:
    """`org/name` with no such local path: a hub id (a mistyped local path starts with . / or ~)."""
    from pathlib import Path
    return (bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not Path(name).exists())


def load_tokenizer(spec: Any, local_files_only: bool = False) -> Any:
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(spec.model.name_or_path, local_files_only=local_files_only,
                                            trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        name = spec.model.name_or_path
        if _hub_id_not_here(name) and (local_files_only or isinstance(exc, ConnectionError)):
            raise NotReachable(f"model.name_or_path: {name!r} is a hub model that is not in the local cache "
                               "(plan reads local files and the cache only)") from None
        raise SpecError(f"model.name_or_path: cannot load a tokenizer from {name!r}: "
                        f"{str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Padding positions carry label -100 and are masked, so any token id serves.
        tok.pad_token = tok.eos_token
    if spec.model.add_special_tokens:
        add_tokens(tok, spec.model.add_special_tokens)
    return tok


def add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens; return the ids of all of them. Tokens already in the vocabulary
    keep their ids and rows (they still train with LoRA); the ones added here are remembered on the
    tokenizer (`new_token_ids`) so that only their rows are initialised."""
    if tokens:
        vocab = tokenizer.get_vocab()
        new = [t for t in tokens if t not in vocab]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
            tokenizer._distsft_new_ids = sorted(set(getattr(tokenizer, "_distsft_new_ids", []))
                                                | {tokenizer.convert_tokens_to_ids(t) for t in new})
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def new_token_ids(tokenizer: Any) -> list[int]:
    """Ids that `add_tokens` added to this tokenizer (not in the base vocabulary)."""
    return list(getattr(tokenizer, "_distsft_new_ids", []))


def template_markers(template: str) -> list[str]:
    """The control-token markers written literally in a chat template, in order of appearance."""
    seen: dict[str, None] = {}
    for m in _MARKER.finditer(template or ""):
        seen.setdefault(m.group(0))
    return list(seen)


def missing_template_tokens(tokenizer: Any, template: str) -> list[str]:
    """Markers of the template that the tokenizer does not have as a single token."""
    out = []
    for marker in template_markers(template):
        if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
            out.append(marker)
    return out


def missing_tokens_message(spec: Any, tokenizer: Any) -> str | None:
    """The plan/sanity warning for a template marker missing from the vocabulary, or None."""
    from distsft.data.chat import resolve_chat_template
    try:
        template = resolve_chat_template(tokenizer, spec.data.chat_template)
    except Exception:  # noqa: BLE001 - no template: the data pipeline reports that itself
        return None
    missing = missing_template_tokens(tokenizer, template)
    if not missing:
        return None
    listed = ", ".join(missing)
    return (f"the chat template uses {listed}, which the tokenizer of {spec.model.name_or_path} does not have "
            f"as tokens: each is split into ordinary pieces and no embedding learns it (trl#1668); add them "
            f"with {KEY}: [{listed}] (new rows, mean-initialised, trained also with LoRA/QLoRA)")


VOCAB_MULTIPLE = 64


def _weights(module: Any) -> Any:
    return getattr(module, "weight", None)


def init_new_rows(model: Any, tokenizer: Any, new_ids: list[int], pad_to_multiple_of: int | None = None) -> None:
    """Give the added tokens embedding (and untied output) rows: resize when the ids do not fit, then set
    each new row to the mean of the rows of the other tokens (deterministic, in the span of what the
    model knows, and with an output logit near the average instead of a random one). `pad_to_multiple_of`
    (VOCAB_MULTIPLE for full fine-tuning) rounds the resized vocabulary up: an odd size (32,002) leaves
    the head's matmuls off the tensor cores' tile sizes; the rows past the tokenizer get the mean too."""
    import torch
    if not new_ids:
        return
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if max(new_ids) >= old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False, pad_to_multiple_of=pad_to_multiple_of)
    rows = model.get_input_embeddings().weight.shape[0]
    new = torch.tensor(sorted(set(new_ids) | set(range(old_rows, rows))))
    layers = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and _weights(out) is not None and out.weight is not layers[0].weight:
        layers.append(out)
    import contextlib
    gather = contextlib.nullcontext()
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():  # partitioned weights: gather, let rank 0 write, re-partition
        import deepspeed
        gather = deepspeed.zero.GatheredParameters([l.weight for l in layers], modifier_rank=0)
    with torch.no_grad(), gather:
        for layer in layers:
            w = layer.weight
            keep = torch.ones(w.shape[0], dtype=torch.bool)
            keep[new] = False
            w[new.to(w.device)] = w[keep.to(w.device)].float().mean(0).to(w.dtype)


def _module_name(model: Any, module: Any) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def trainable_token_indices(model: Any, ids: list[int], modules_to_save: list[str]) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for the added tokens: the input embedding and, when it is not tied
    to it, the output head (a layer already in modules_to_save trains in full and is left out)."""
    if not ids:
        return None
    ids = sorted(set(ids))
    out: dict[str, list[int]] = {}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [emb] if head is None or head.weight is emb.weight else [emb, head]
    for layer in layers:
        name = _module_name(model, layer)
        if name and not any(name == m or name.endswith("." + m) for m in modules_to_save):
            out[name.split(".")[-1]] = ids
    return out or None


def plan_warnings(spec: Any) -> list[str]:
    """For `distsft plan`: the missing-marker warning, when the tokenizer can be read locally."""
    try:
        msg = missing_tokens_message(spec, load_tokenizer(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by the data step already
        return []
    return [msg] if msg else []


def sanity_results(spec: Any) -> list[tuple[str, str]]:
    """For `distsft sanity`: WARN when a template marker is missing, PASS otherwise."""
    warnings = plan_warnings(spec)
    if warnings:
        return [("WARN", w) for w in warnings]
    return [("PASS", "every control-token marker of the chat template is a token of the vocabulary")]


def expose_head_bias(model: Any) -> None:
    """TRL's SFTTrainer computes the loss with a fused LM head that reads `lm_head.weight` and
    `lm_head.bias`. PEFT's TrainableTokensWrapper answers `.weight` with the merged (trained) rows but
    has no `.bias`; give the wrapper its base layer's bias (None for Llama-like heads) as a plain
    attribute, so the fused head sees the trained rows instead of failing."""
    head = model.get_output_embeddings()
    adapter = getattr(head, "token_adapter", None)
    if head is None or adapter is None or "bias" in vars(head):
        return
    base = adapter.get_base_layer() if hasattr(adapter, "get_base_layer") else None
    object.__setattr__(head, "bias", getattr(base, "bias", None))
