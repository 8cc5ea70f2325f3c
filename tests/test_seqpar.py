"""Sequence parallelism units (train.seqpar) and one 2-process check of the attention itself: DeepSpeed's
real Ulysses wrapper over gloo, with distsft's isolating core, gives every packed example the logits it
has alone -- also for examples that straddle the shard border -- while the wrapper without it does not."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from distsft.train import seqpar

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"


def test_example_spans_follow_position_resets() -> None:
    pos = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 0])
    assert seqpar.example_spans(pos) == [(0, 3), (3, 5), (5, 9), (9, 10)]
    # a shard that starts mid-example (a rank's view) still splits at the resets
    assert seqpar.example_spans(torch.tensor([5, 6, 0, 1])) == [(0, 2), (2, 4)]
    assert seqpar.example_spans(torch.tensor([0, 1, 2, 3])) == [(0, 4)]


def test_layout_groups_consecutive_ranks() -> None:
    got = [(seqpar.Layout(4, r, 2).dp_rank, seqpar.Layout(4, r, 2).sp_rank) for r in range(4)]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert seqpar.Layout(4, 0, 2).dp_size == 2


@pytest.mark.parametrize("accum,start", [(4, 0), (3, 0), (3, 2), (1, 1)])
def test_group_micro_batches_replay_the_data_parallel_order(accum: int, start: int) -> None:
    """Interleaving the group's loader batches as the Ulysses adapter does (round k: rank 0's k-th batch,
    rank 1's k-th, ...) gives the group's micro-batches of every step in order, from the resume step."""
    total, S = 5, 2

    def blocks(step: int) -> list[list[int]]:
        return [[step * 100 + m] for m in range(accum)]

    per_rank = [list(seqpar.group_micro_batches(blocks, accum, seqpar.Layout(S, r, S), start, total))
                for r in range(S)]
    assert len({len(p) for p in per_rank}) == 1  # every rank of the group loads as many batches
    seen = [b for rnd in zip(*per_rank) for b in rnd]
    want = [blocks(s)[m] for s in range(start, total) for m in range(accum)]
    assert seen[:len(want)] == want
    assert all(b[0] // 100 >= total for b in seen[len(want):])  # only completing the last round


def test_shard_rows_shifts_labels_before_slicing() -> None:
    labels = torch.tensor([[-100, 11, 12, 13, 14, -100]])
    batch = {"input_ids": torch.arange(6)[None], "position_ids": torch.arange(6)[None],
             "attention_mask": torch.ones(1, 1, 6, 6, dtype=torch.bool)}
    parts = [seqpar.shard_rows(batch, labels, seqpar.Layout(2, r, 2)) for r in range(2)]
    assert "attention_mask" not in parts[0][0]
    assert parts[0][0]["input_ids"].tolist() == [[0, 1, 2]]
    assert parts[1][0]["position_ids"].tolist() == [[3, 4, 5]]
    # position 2 (last of shard 0) is trained to predict token 3 (first of shard 1)
    assert parts[0][1].tolist() == [[11, 12, 13]]
    assert parts[1][1].tolist() == [[14, -100, -100]]
    with pytest.raises(ValueError, match="multiple of sequence_parallel_size"):
        seqpar.shard_rows(batch, labels, seqpar.Layout(4, 0, 4))


def test_fill_rows_pads_to_the_micro_batch() -> None:
    assert seqpar.fill_rows([7], 3) == ([7, 7, 7], 1)
    assert seqpar.fill_rows([], 2) == ([0, 0], 0)
    assert seqpar.fill_rows([1, 2], 2) == ([1, 2], 2)


def test_isolating_core_equals_the_block_mask_on_one_process() -> None:
    """Without any process group: the per-example calls equal one call with the block-diagonal mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 1
        training = False

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5, 0]])
    seg = torch.stack([torch.cumsum((p == 0).long(), 0) for p in pos])
    mask = (seg[:, :, None] == seg[:, None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    want, _ = sdpa_attention_forward(Layer(), q, k, v, mask[:, None])
    got, _ = seqpar.isolating(sdpa_attention_forward, "sdpa")(Layer(), q, k, v, None, position_ids=pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    plain, _ = sdpa_attention_forward(Layer(), q, k, v, None)
    assert not torch.allclose(plain, want, atol=1e-3)  # the check can fail: plain causal differs


def test_sliding_window_band_inside_an_example() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Layer(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 1
        sliding_window = 3

    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 7, 4) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1]])
    i = torch.arange(7)
    seg = torch.cumsum((pos[0] == 0).long(), 0)
    mask = (seg[:, None] == seg[None, :]) & (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 3)
    want, _ = sdpa_attention_forward(Layer(), q, k, v, mask[None, None])
    got, _ = seqpar.isolating(sdpa_attention_forward, "sdpa")(Layer(), q, k, v, None, position_ids=pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ 2 processes, real Ulysses


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, isolate: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoModelForCausalLM
    deepspeed.init_distributed(dist_backend="gloo")
    if isolate:
        seqpar.install()
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="sdpa", dtype=torch.float32).eval()
    UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation="sdpa",
                                                   sequence_parallel_size=2, micro_batch_size=2,
                                                   seq_length_is_variable=True)
    # Two packed rows of 16 tokens: examples of 5, 7 (straddling the border at 8) and 4; 10, 6 (straddling).
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 7, 4], [10, 6]]
    ids = torch.randint(5, 500, (2, 16), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    layout = seqpar.Layout(2, rank, 2)
    inputs, _ = seqpar.shard_rows({"input_ids": ids, "position_ids": pos}, torch.full((2, 16), -100), layout)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"rank": rank, "logits": logits, "ids": ids, "lengths": lengths}, f"{out_dir}/rank{rank}.pt")
    import torch.distributed as tdist
    tdist.barrier()
    tdist.destroy_process_group()


def _run_pair(tmp_path: Path, isolate: bool) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    import torch.multiprocessing as mp
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(_free_port(), isolate, str(tmp_path)), nprocs=2, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    return torch.cat([p["logits"] for p in parts], dim=1), parts[0]["ids"], parts[0]["lengths"]


@pytest.mark.slow
def test_ulysses_packed_examples_have_their_own_logits(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="sdpa", dtype=torch.float32).eval()
    logits, ids, lengths = _run_pair(tmp_path / "iso", isolate=True)
    raw, _, _ = _run_pair(tmp_path / "raw", isolate=False)
    worst_raw = 0.0
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            with torch.no_grad():
                alone = model(input_ids=ids[b:b + 1, start:start + n]).logits[0]
            torch.testing.assert_close(logits[b, start:start + n], alone, atol=1e-5, rtol=1e-5)
            worst_raw = max(worst_raw, float((raw[b, start:start + n] - alone).abs().max()))
            start += n
    # DeepSpeed's wrapper alone (mask dropped): later examples see the earlier ones.
    assert worst_raw > 1e-3


def test_group_batch_sampler_covers_each_step_s_global_batch_once() -> None:
    """4 ranks in 2 groups of 2, micro 2 x accum 3 x 2 groups = 12 rows a step: the micro-batches the
    groups train (adapter order) are exactly the step's rows of the global order, each once."""
    from distsft.data.sampler import GlobalOrder
    order = GlobalOrder(100, 12, seed=3)
    total, micro, accum = 5, 2, 3
    per_rank = {r: list(seqpar.GroupBatchSampler(order, micro, accum, seqpar.Layout(4, r, 2), total,
                                                 lambda: 1)) for r in range(4)}
    for g in (0, 1):
        trained = [b for rnd in zip(per_rank[2 * g], per_rank[2 * g + 1]) for b in rnd][:(total - 1) * accum]
        per_rank[g] = [trained[i:i + accum] for i in range(0, len(trained), accum)]  # by step
    for i, step in enumerate(range(1, total)):
        rows = sorted(r for g in (0, 1) for b in per_rank[g][i] for r in b)
        assert rows == sorted(order.step_rows(step).tolist())
