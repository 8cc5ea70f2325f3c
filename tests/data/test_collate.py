import numpy as np
import pytest
import torch

from distsft.data.collate import PackedCollator

PAD = 0


def _examples(seed=0, lengths=(7, 12, 5, 9, 4)):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(5, 500, size=n)
        labels = ids.copy()
        labels[: n // 2] = -100  # a prompt part without loss
        out.append((ids, labels))
    return out


def _rows(examples, groups=((0, 1, 2), (3, 4))):
    rows = []
    for g in groups:
        rows.append({"input_ids": np.concatenate([examples[i][0] for i in g]).tolist(),
                     "labels": np.concatenate([examples[i][1] for i in g]).tolist(),
                     "seq_lengths": [len(examples[i][0]) for i in g]})
    return rows


def test_layout_positions_labels_and_block_diagonal_mask():
    ex = _examples()
    derived = PackedCollator(PAD, "sdpa", pad_to_multiple_of=8)(_rows(ex))
    assert set(derived) == {"input_ids", "labels", "position_ids", "use_cache"}  # the model builds the masks
    batch = PackedCollator(PAD, "sdpa", pad_to_multiple_of=8, explicit_mask=True)(_rows(ex))
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache", "attention_mask"}
    assert all(torch.equal(batch[k], derived[k]) for k in ("input_ids", "labels", "position_ids"))
    assert batch["input_ids"].shape == (2, 24)  # longest row 24 tokens, already a multiple of 8
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(5)]
    assert batch["position_ids"][1, :13].tolist() == [*range(9), *range(4)]
    assert (batch["input_ids"][1, 13:] == PAD).all() and (batch["labels"][1, 13:] == -100).all()
    assert batch["labels"][0, [0, 7, 19]].tolist() == [-100, -100, -100]  # first token of each example
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 24, 24) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert m[8, 7] and m[8, 8] and not m[8, 6] and not m[8, 9]  # own example only, causal
    pads = mask[1, 0, 13:]
    assert (pads.sum(-1) == 1).all() and pads[:, 13:].diagonal().all()  # padding sees itself only
    assert (mask.sum(-1) >= 1).all()  # no fully masked row -> no NaN


def test_eager_mask_is_additive_float_and_flash_is_padding_free():
    ex = _examples()
    eager = PackedCollator(PAD, "eager", explicit_mask=True)(_rows(ex))["attention_mask"]
    assert eager.dtype == torch.float32 and set(eager.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    fa = PackedCollator(PAD, "flash_attention_2", pad_to_multiple_of=16)(_rows(ex))
    assert "attention_mask" not in fa
    assert fa["input_ids"].shape == (1, 48)  # 24 + 13 tokens, padded to 48
    assert fa["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 33, 37, 48]
    assert fa["max_length_q"] == 12
    assert fa["position_ids"][0, 24:37].tolist() == [*range(9), *range(4)]
    with pytest.raises(ValueError, match="supports"):
        PackedCollator(PAD, "auto")
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        PackedCollator(PAD, "sdpa")([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="do not sum"):
        PackedCollator(PAD, "sdpa")([{"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [1]}])


def _per_example(model, ex):
    logits, losses, counts = [], [], []
    for ids, labels in ex:
        out = model(input_ids=torch.tensor(ids)[None], labels=torch.tensor(labels)[None])
        logits.append(out.logits[0])
        losses.append(out.loss)
        counts.append(int((labels[1:] != -100).sum()))
    return logits, losses, counts


@pytest.mark.parametrize("attn,explicit", [("sdpa", False), ("eager", False), ("sdpa", True), ("eager", True)])
def test_packed_logits_and_loss_equal_one_example_at_a_time(tiny_model_dir, attn, explicit):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    ex = _examples()
    groups = ((0, 1, 2), (3, 4))
    batch = PackedCollator(PAD, attn, explicit_mask=explicit)(_rows(ex, groups))
    with torch.no_grad():
        out = model(**batch)
        alone, losses, counts = _per_example(model, ex)
    for b, g in enumerate(groups):
        p = 0
        for i in g:
            n = len(ex[i][0])
            torch.testing.assert_close(out.logits[b, p:p + n], alone[i], atol=1e-5, rtol=0)
            p += n
    weighted = sum(l * c for l, c in zip(losses, counts)) / sum(counts)
    torch.testing.assert_close(out.loss, weighted, atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_flash_attention_2_isolates_examples(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    ex = _examples()
    batch = PackedCollator(PAD, "flash_attention_2")(_rows(ex))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch)
        p = 0
        for ids, _ in ex:
            alone = model(input_ids=torch.tensor(ids, device="cuda")[None]).logits[0]
            torch.testing.assert_close(out.logits[0, p:p + len(ids)], alone, atol=2e-2, rtol=0)
            p += len(ids)
