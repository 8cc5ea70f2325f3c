"""Exact attention in torch behind flash-attn 2.x's function signatures and input checks (see __init__)."""

from __future__ import annotations

from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softcap: float,
               alibi_slopes: Any, return_attn_probs: bool) -> None:
    """The checks of flash_api.cpp (mha_fwd / mha_varlen_fwd), with its messages."""
    if q.dtype not in HALF:
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    if v.dtype != q.dtype:
        raise RuntimeError("query and value must have the same dtype")
    if not (q.device == k.device == v.device):
        raise RuntimeError("q, k and v must be on the same device")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise RuntimeError(f"Input tensor must have contiguous last dimension ({name})")
    head_dim = q.shape[-1]
    if head_dim > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise RuntimeError("q, k and v must have the same head dimension")
    if q.shape[-2] % k.shape[-2] != 0:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if k.shape != v.shape:
        raise RuntimeError("k and v must have the same shape")
    if softcap > 0 and dropout_p > 0:
        raise RuntimeError("Softcapping does not support dropout for now")
    if alibi_slopes is not None:
        raise NotImplementedError("the CPU stand-in of flash-attn does not implement alibi_slopes")
    if return_attn_probs:
        raise NotImplementedError("the CPU stand-in of flash-attn does not return attention probabilities")


def _window(window_size: Any) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    return left, right


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
            window: tuple[int, int], softcap: float, dropout_p: float) -> torch.Tensor:
    """One sequence: q [Sq, H, D], k/v [Sk, Hk, D] -> [Sq, H, D] in q's dtype, computed in fp32."""
    sq, heads, _ = q.shape
    sk, heads_k, _ = k.shape
    rep = heads // heads_k  # GQA: q heads h*rep .. h*rep+rep-1 read k/v head h
    qf = q.float()
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    # Bottom-right alignment: query i sits at key position i + (sk - sq).
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    left, right = window
    if causal:
        allowed &= j <= i
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    empty = ~allowed.any(-1, keepdim=True)  # [Sq, 1]: such rows output 0 (and get no gradient)
    scores = scores.masked_fill(~allowed & ~empty, float("-inf")).masked_fill(empty, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim)."""
    _check_qkv(q, k, v, dropout_p, softcap, alibi_slopes, return_attn_probs)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
        raise RuntimeError(f"flash_attn_func expects 4-D q/k/v with one batch size, got {tuple(q.shape)}, "
                           f"{tuple(k.shape)}")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    win = _window(window_size)
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal, win, softcap, dropout_p)
                        for b in range(q.shape[0])])


def _check_cu(cu: torch.Tensor, name: str, total: int, batch: int | None) -> list[int]:
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype int32")
    if cu.dim() != 1 or not cu.is_contiguous():
        raise RuntimeError(f"{name} must be a contiguous 1-D tensor")
    if batch is not None and cu.numel() != batch + 1:
        raise RuntimeError(f"{name} must have shape (batch_size + 1,) = ({batch + 1},), got {tuple(cu.shape)}")
    bounds = cu.tolist()
    # Beyond the real kernel, which would read out of bounds or silently mix sequences:
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])) or bounds[-1] != total:
        raise RuntimeError(f"{name} must start at 0, never decrease and end at the token count {total}: {bounds}")
    return bounds


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.dtype.is_floating_point:
            raise TypeError(f"{name} must be an int")
        return int(x)
    if not isinstance(x, int) or isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens: int32 (batch + 1,)."""
    _check_qkv(q, k, v, dropout_p, softcap, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("the CPU stand-in of flash-attn does not implement a paged KV cache (block_table)")
    if q.dim() != 3 or k.dim() != 3:
        raise RuntimeError(f"flash_attn_varlen_func expects 3-D (total, nheads, headdim) q/k/v, got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}")
    bq = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.shape[0], None)
    bk = _check_cu(cu_seqlens_k, "cu_seqlens_k", k.shape[0], len(bq) - 1)
    mq, mk = _as_int(max_seqlen_q, "max_seqlen_q"), _as_int(max_seqlen_k, "max_seqlen_k")
    longest_q = max((b - a for a, b in zip(bq[:-1], bq[1:])), default=0)
    longest_k = max((b - a for a, b in zip(bk[:-1], bk[1:])), default=0)
    if mq < longest_q or mk < longest_k:
        raise RuntimeError(f"max_seqlen_q/k ({mq}, {mk}) below the longest sequence ({longest_q}, {longest_k}): "
                           "the real kernel would silently truncate")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    win = _window(window_size)
    parts = [_attend(q[a:b], k[c:d], v[c:d], scale, causal, win, softcap, dropout_p)
             for a, b, c, d in zip(bq[:-1], bq[1:], bk[:-1], bk[1:])]
    return torch.cat(parts) if parts else q.new_zeros(q.shape)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    raise NotImplementedError("the CPU stand-in of flash-attn does not implement flash_attn_with_kvcache "
                              "(paged decoding, used by continuous batching only)")

