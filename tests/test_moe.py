"""Mixture-of-experts units on tiny random Qwen3-MoE, Mixtral and gpt-oss models (built from configs,
examples/make_tiny_moe.py): layout detection, routers left out of `all-linear`, expert adapters on
request, the router loss reaching the gradients, DFT, per-source sums, expert quantization under
QLoRA and packed-example isolation (gpt-oss's sliding layers and sinks included)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import make_tiny_moe  # noqa: E402

from distsft.config.moe import active_parameters, is_expert_parameter, moe_of  # noqa: E402
from distsft.errors import SpecError  # noqa: E402
from distsft.train import losses, moe  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")


@pytest.fixture(scope="session")
def tiny_moe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {f: make_tiny_moe.build(root / f, f) for f in (*FAMILIES, "dense")}


def _load(path: Path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)


def _batch(seed: int = 0, B: int = 2, L: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_routers_and_active_parameters(tiny_moe_dirs, family):
    model = _load(tiny_moe_dirs[family])
    layout = moe_of(model.config)
    assert layout is not None and layout.num_experts == 8 and layout.top_k == 2 and layout.returns_router_logits
    assert len(moe.routers(model)) == model.config.num_hidden_layers
    assert moe.fused_expert_parameter_names(model) == ["gate_up_proj", "down_proj"]
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in moe.expert_parameters(model))
    assert 0 < experts < total
    active = active_parameters(total, experts, layout)
    assert active == total - experts + experts * 2 // 8
    assert not any(is_expert_parameter(n) for n, _ in moe.routers(model))


def test_dense_model_is_not_moe(tiny_moe_dirs):
    model = _load(tiny_moe_dirs["dense"])
    assert moe_of(model.config) is None and moe.routers(model) == []
    total = sum(p.numel() for p in model.parameters())
    assert active_parameters(total, 0, None) == total
    with pytest.raises(SpecError, match=r"train\.router_aux_loss_coef"):
        moe.moe_or_error(model, "train.router_aux_loss_coef")
    assert moe.lora_targets(model, "all-linear") == "all-linear"  # dense models: PEFT's own rule


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_leaves_routers_alone_and_experts_on_request(tiny_moe_dirs, family):
    from peft import LoraConfig, get_peft_model
    for target_parameters in ([], ["experts.gate_up_proj", "experts.down_proj"]):
        model = _load(tiny_moe_dirs[family])
        router_names = [n for n, _ in moe.routers(model)]
        moe.check_target_parameters(model, target_parameters)
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=moe.lora_targets(model, "all-linear"),
                                              target_parameters=target_parameters, task_type="CAUSAL_LM"))
        adapted = {n.split(".lora_")[0] for n, p in pm.named_parameters() if p.requires_grad}
        assert not any(r in a for a in adapted for r in router_names), adapted
        assert any("self_attn.q_proj" in a for a in adapted)
        assert any(".experts" in a for a in adapted) == bool(target_parameters)


def test_target_parameters_matching_nothing_is_a_spec_error(tiny_moe_dirs):
    model = _load(tiny_moe_dirs["qwen3_moe"])
    with pytest.raises(SpecError, match=r"peft\.target_parameters.*experts\.w1.*experts\.gate_up_proj"):
        moe.check_target_parameters(model, ["experts.w1"])


def _router_grads(model, ids, labels, coef: float, loss_type: str = "nll"):
    from trl.trainer.utils import add_fused_lm_head
    add_fused_lm_head(model, outputs=("log_probs",))
    layout = moe_of(model.config)
    model.zero_grad()
    with moe.router_logits(model) as found:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    aux = moe.load_balancing_loss(found, layout, torch.ones_like(ids, dtype=torch.bool))
    ml = losses.micro_loss(out, loss_type, None, 1.0, aux=aux, aux_coef=coef)
    ml.loss.backward()
    grads = torch.cat([m.weight.grad.flatten() for _, m in moe.routers(model)])
    return ml, grads


@pytest.mark.parametrize("family", FAMILIES)
def test_router_loss_reaches_the_router_and_not_the_logged_loss(tiny_moe_dirs, family):
    ids, labels = _batch()
    model = _load(tiny_moe_dirs[family])
    m0, g0 = _router_grads(model, ids, labels, 0.0)
    m1, g1 = _router_grads(model, ids, labels, 0.5)
    assert m0.aux_loss is not None and float(m0.aux_loss) > 0 and float(m0.aux_loss) == pytest.approx(float(m1.aux_loss))
    assert float(m0.nll_sum) == pytest.approx(float(m1.nll_sum), rel=1e-6)  # the logged LM loss ignores the coefficient
    assert not torch.allclose(g0, g1)  # ...while the router's gradient does not
    # coefficient 0: the router's gradient is the LM loss's alone
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
    (-out.log_probs.sum() / out.label_mask.sum()).backward()
    lm_only = torch.cat([m.weight.grad.flatten() for _, m in moe.routers(model)])
    torch.testing.assert_close(g0, lm_only)


def test_dft_weights_tokens_by_probability_with_the_same_normalisation():
    log_probs = torch.tensor([[-0.1, -2.0, 0.0, -0.7]], requires_grad=True)
    mask = torch.tensor([[True, True, False, True]])

    class Out:
        pass
    out = Out()
    out.log_probs, out.label_mask = log_probs, mask
    nll = losses.micro_loss(out, "nll", 6, 2.0)
    dft = losses.micro_loss(out, "dft", 6, 2.0)
    assert float(nll.nll_sum) == float(dft.nll_sum) == pytest.approx(2.8)  # logged loss: NLL under both
    assert float(nll.loss.detach()) == pytest.approx(2.8 / 6 * 2.0)
    expected = sum(-lp * torch.tensor(lp).exp().item() for lp in (-0.1, -2.0, -0.7)) / 6 * 2.0
    assert float(dft.loss.detach()) == pytest.approx(expected)
    dft.loss.backward()
    # d/dlp of -lp·sg(e^lp) = -e^lp: DFT's gradient is the NLL's (-1) scaled by each token's probability
    # (an unlabelled position's log-prob is a constant 0 from the fused head, so nothing flows back there)
    torch.testing.assert_close(log_probs.grad, -log_probs.detach().exp() * 2.0 / 6)
    with pytest.raises(ValueError, match="loss_type"):
        losses.token_objective(log_probs, "mse")


def test_per_source_sums_follow_the_label_token():
    # two rows, positions 0..4; source ids per input position (-1: padding)
    src = torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, -1, -1]])
    log_probs = -torch.arange(1, 9, dtype=torch.float32).reshape(2, 4)
    mask = torch.tensor([[True, False, True, True], [True, True, False, False]])
    sums = losses.per_source_sums(log_probs, mask, src, 3)
    # row 0: predicted positions 1..4 belong to sources 0,1,1,1 -> source 0: 1.0; source 1: 3+4
    # row 1: positions 1,2 -> source 2: 5+6
    assert sums.tolist() == [[1.0, 1.0], [7.0, 2.0], [11.0, 2.0]]


def test_qlora_quantizes_the_experts(tiny_moe_dirs):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dirs["qwen3_moe"], quantization_config=q,
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})
    before = moe.loaded_bytes(model)
    # bitsandbytes quantizes nn.Linear only: the 3-D experts are still bf16 (2 bytes per weight)
    n_expert = sum(p.numel() for _, p in moe.expert_parameters(model))
    assert before["experts"] == 2 * n_expert
    ids, _ = _batch(L=16)
    with torch.no_grad():
        ref = model(ids).logits.float()
    saved = moe.quantize_experts(model)
    after = moe.loaded_bytes(model)
    assert saved == before["experts"] - after["experts"]
    assert after["experts"] < 0.3 * before["experts"]  # NF4: ~0.5 byte per weight + block constants
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()  # the same model, at 4-bit precision


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_examples_stay_isolated(tiny_moe_dirs, family, attn):
    """A packed example's logits equal its logits alone: routing is per token, and gpt-oss's sliding
    window (8 tokens here, shorter than the examples) and sinks respect the packed mask."""
    from distsft.data.collate import PackedCollator
    from distsft.data.layer_masks import sliding_window_of, with_layer_masks
    # as the ranks load it: `auto` picks sdpa on CPU, and gpt-oss (no sdpa path: attention sinks) falls back
    model = moe.load_attention(lambda a: _load(tiny_moe_dirs[family], attn_implementation=a), attn, "auto").eval()
    attn = moe.attention_of(model, attn)
    assert attn == ("eager" if family == "gpt_oss" else attn)
    g = torch.Generator().manual_seed(1)
    lens = [11, 17, 6]
    exs = [torch.randint(5, 500, (n,), generator=g) for n in lens]
    row = {"input_ids": torch.cat(exs).tolist(), "labels": torch.cat(exs).tolist(), "seq_lengths": lens}
    # Both packed paths: transformers' own per-layer-type masks from the reset position_ids (the default),
    # and distsft's explicit 4-D mask windowed per layer type (remote-code models, data.layer_masks).
    from distsft.train.model import derives_packed_masks
    assert derives_packed_masks(model) == (family != "gpt_oss")
    for explicit in (False, True):
        if not explicit and not derives_packed_masks(model):
            continue  # gpt-oss does not give transformers' mask functions its position_ids: explicit masks
        batch = PackedCollator(0, attn, explicit_mask=explicit)([row])
        batch.pop("labels")
        batch = with_layer_masks(batch, sliding_window_of(model.config))
        if explicit:
            assert isinstance(batch["attention_mask"], dict) == (family == "gpt_oss")
        with torch.no_grad():
            packed = model(**batch).logits[0]
            start = 0
            for ex in exs:
                alone = model(input_ids=ex[None]).logits[0]
                torch.testing.assert_close(packed[start:start + len(ex)], alone, atol=1e-5, rtol=1e-5)
                start += len(ex)


def test_mxfp4_checkpoint_is_dequantized_and_trains(tmp_path):
    """A gpt-oss checkpoint stored as released (experts in MXFP4): loaded dequantized, said so, and the
    experts get gradients; QLoRA on it is refused naming the key."""
    from transformers import AutoConfig
    path = make_tiny_moe.build_mxfp4(tmp_path / "gpt_oss_mxfp4")
    config = AutoConfig.from_pretrained(path)
    kwargs, note = moe.checkpoint_quantization(config, "lora")
    assert "dequantized" in note and kwargs["quantization_config"].dequantize
    model = _load(path, **kwargs)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32 and experts.gate_up_proj.shape == (8, 64, 64)
    # the first expert's first output column from the checkpoint's own codes: FP4 E2M1 value × 2^-5
    from safetensors.torch import load_file
    raw = load_file(path / "model.safetensors")
    blocks = raw["model.layers.0.mlp.experts.gate_up_proj_blocks"][0, 0].reshape(-1)  # 64 inputs, 2 a byte
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=1).reshape(-1).long()
    torch.testing.assert_close(experts.gate_up_proj[0, :, 0], fp4[codes] * 2.0**-5)
    ids, labels = _batch(L=12)
    model(input_ids=ids, labels=labels).loss.backward()
    assert experts.gate_up_proj.grad is not None and experts.gate_up_proj.grad.abs().sum() > 0
    with pytest.raises(SpecError, match=r"peft\.method=qlora.*MXFP4"):
        moe.checkpoint_quantization(config, "qlora")
    assert moe.checkpoint_quantization(object(), "qlora") == ({}, None)  # not stored quantized: nothing to do


def test_token_sources_follow_packing_and_flash_concatenation():
    from distsft.data.source_ids import token_sources
    rows = [{"seq_lengths": [2, 3], "source_ids": [1, 0]}, {"seq_lengths": [2], "source_ids": [2]}]
    ids, mask = token_sources(rows, (2, 5))
    assert ids.tolist() == [[1, 1, 0, 0, 0], [2, 2, -1, -1, -1]]
    assert mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    ids, _ = token_sources(rows, (1, 8))  # flash attention: one concatenated row, padded
    assert ids.tolist() == [[1, 1, 0, 0, 0, 2, 2, -1]]


def test_loss_computer_logs_the_lm_loss_per_label_and_the_router_loss(tiny_moe_dirs):
    """The trainer's loss on a real model: the optimized loss is NLL + coef × aux; per-label sums are
    the NLL split by source label (two sources share the label `a`); reduce() gives token-weighted parts
    of the whole and aux_loss."""
    from types import SimpleNamespace

    from trl.trainer.utils import add_fused_lm_head

    from distsft.data.collate import PackedCollator
    from distsft.data.source_ids import token_sources
    model = _load(tiny_moe_dirs["qwen3_moe"])
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    g = torch.Generator().manual_seed(3)
    rows = []
    for lens, srcs in (([7, 9], [0, 2]), ([12], [1])):
        ids = torch.randint(5, 500, (sum(lens),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lengths": lens, "source_ids": srcs})
    batch = PackedCollator(0, "sdpa")(rows)
    batch["source_ids"], batch["token_mask"] = token_sources(rows, tuple(batch["input_ids"].shape))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=1, unwrap_model=lambda m: m),
                              args=SimpleNamespace(average_tokens_across_devices=True),
                              current_gradient_accumulation_steps=1)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    computer = losses.LossComputer(model, "nll", aux_coef=0.5, source_labels=["a", "b", "a"])
    ml = computer(trainer, model, dict(batch), n_items)
    ml.nll_sum, ml.tokens, ml.aux_loss = float(ml.nll_sum), int(ml.tokens), float(ml.aux_loss)
    window = computer.window_sums()  # one rank: its sums are the totals
    assert window.dtype == torch.float64 and window.device == ml.loss.device
    assert ml.aux_loss > 0
    assert float(ml.loss.detach()) == pytest.approx(ml.nll_sum / n_items + 0.5 * ml.aux_loss, rel=1e-5)
    got = computer.metrics(window.tolist(), float(ml.tokens), 1)
    assert got["aux_loss"] == pytest.approx(ml.aux_loss)
    assert got["loss_tokens_a"] + got["loss_tokens_b"] == ml.tokens
    assert got["loss_tokens_b"] == 11  # the 12-token example of source 1: 11 predicted tokens
    whole = (got["loss_a"] * got["loss_tokens_a"] + got["loss_b"] * got["loss_tokens_b"]) / ml.tokens
    assert whole == pytest.approx(ml.nll_sum / ml.tokens, rel=1e-6)
    assert 0 <= got["mean_token_accuracy"] <= 1 and got["entropy"] > 0
    assert not computer.window_sums().any()  # the window was reset


def test_all_sliding_models_get_one_windowed_mask(tmp_path):
    """Mistral slides in every layer and takes one mask: packed isolation with a window shorter than
    the examples."""
    from transformers import MistralConfig, MistralForCausalLM

    from distsft.data.collate import PackedCollator
    from distsft.data.layer_masks import sliding_window_of, with_layer_masks
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    model = MistralForCausalLM(cfg).eval()
    assert sliding_window_of(cfg) == (5, False)
    g = torch.Generator().manual_seed(2)
    exs = [torch.randint(5, 500, (n,), generator=g) for n in (9, 13)]
    row = {"input_ids": torch.cat(exs).tolist(), "labels": torch.cat(exs).tolist(), "seq_lengths": [9, 13]}
    batch = with_layer_masks(PackedCollator(0, "sdpa", explicit_mask=True)([row]), sliding_window_of(cfg))
    batch.pop("labels")
    assert isinstance(batch["attention_mask"], torch.Tensor)
    with torch.no_grad():
        packed = model(**batch).logits[0]
        torch.testing.assert_close(packed[9:], model(input_ids=exs[1][None]).logits[0], atol=1e-5, rtol=1e-5)


def test_mfu_counts_active_parameters(tiny_moe_dirs):
    from distsft.observe.mfu import count_parameters
    model = _load(tiny_moe_dirs["qwen3_moe"])
    embed = model.get_input_embeddings().weight.numel()
    every = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for _, p in moe.expert_parameters(model))
    assert count_parameters(model) == (every - embed - experts * 3 // 4, every - experts * 3 // 4)
    dense = _load(tiny_moe_dirs["dense"])
    d_every = sum(p.numel() for p in dense.parameters())
    assert count_parameters(dense) == (d_every - dense.get_input_embeddings().weight.numel(), d_every)


def _spec(path, **sections):
    from distsft.config.spec import validate
    raw = {"model": {"name_or_path": str(path)}, "data": {"train_files": ["x.jsonl"], "max_length": 128},
           "train": {"bf16": False}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return validate(raw)


def test_plan_counts_active_parameters_and_expert_bytes(tiny_moe_dirs):
    """plan: num_active_parameters (= num_parameters for a dense model); under QLoRA the experts count at
    the bytes the ranks give them (NF4; bf16 when sharded), LoRA on experts at PEFT's adapter size."""
    from peft import LoraConfig, get_peft_model

    from distsft.plan import memory
    dense = memory.estimate(_spec(tiny_moe_dirs["dense"]))
    assert dense["num_active_parameters"] == dense["num_parameters"]
    model = _load(tiny_moe_dirs["qwen3_moe"])
    experts = sum(p.numel() for _, p in moe.expert_parameters(model))
    est = memory.estimate(_spec(tiny_moe_dirs["qwen3_moe"]))
    assert est["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert est["num_active_parameters"] == est["num_parameters"] - experts * 3 // 4
    q = {"peft": {"method": "qlora"}}
    shape = memory.model_shape(str(tiny_moe_dirs["qwen3_moe"]))
    ddp = memory.estimate(_spec(tiny_moe_dirs["qwen3_moe"], **q), shape=shape)
    fsdp = memory.estimate(_spec(tiny_moe_dirs["qwen3_moe"], distributed={"backend": "fsdp"}, **q), shape=shape)
    assert memory.qlora_expert_bytes(_spec(tiny_moe_dirs["qwen3_moe"], **q), shape, False) == memory.QLORA_BYTES_PER_PARAM
    assert memory.qlora_expert_bytes(_spec(tiny_moe_dirs["qwen3_moe"], **q), shape, True) == 2.0
    adapted = _spec(tiny_moe_dirs["qwen3_moe"], peft={"method": "qlora", "target_parameters": ["experts.down_proj"]})
    assert memory.qlora_expert_bytes(adapted, shape, False) == 4.0  # PEFT upcasts unquantized weights to fp32
    assert fsdp["trainable_parameters"] == ddp["trainable_parameters"]
    # LoRA on the experts: the estimate's trainable count is PEFT's
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    est = memory.estimate(_spec(tiny_moe_dirs["qwen3_moe"], peft={"method": "lora", "r": 4, "target_parameters": targets}),
                          shape=shape)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=moe.lora_targets(model, "all-linear"),
                                          target_parameters=targets, task_type="CAUSAL_LM"))
    assert est["trainable_parameters"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_router_coefficient_on_a_dense_model_is_refused_at_plan_time(tiny_moe_dirs):
    from distsft.plan import memory
    with pytest.raises(SpecError, match=r"train\.router_aux_loss_coef.*not a mixture-of-experts"):
        memory.estimate(_spec(tiny_moe_dirs["dense"], train={"router_aux_loss_coef": 0.1}))
    assert memory.estimate(_spec(tiny_moe_dirs["qwen3_moe"], train={"router_aux_loss_coef": 0.1}))


def test_an_moe_checkpoint_reloads_its_experts(tiny_moe_dirs, tmp_path):
    """transformers saves MoE checkpoints per expert; HF Trainer's resume (load_state_dict, strict=False)
    would leave the fused experts at their initial weights. reload_checkpoint_weights restores all."""
    trained = _load(tiny_moe_dirs["qwen3_moe"])
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    trained.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    model = _load(tiny_moe_dirs["qwen3_moe"])
    result = model.load_state_dict(saved, strict=False)  # what HF's resume does
    assert any("experts.gate_up_proj" in k for k in result.missing_keys)  # the experts were not loaded
    assert moe.reload_checkpoint_weights(model, str(tmp_path / "ckpt"))
    for (n, a), b in zip(model.state_dict().items(), trained.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    dense = _load(tiny_moe_dirs["dense"])
    dense.save_pretrained(tmp_path / "dense")
    assert not moe.reload_checkpoint_weights(dense, str(tmp_path / "dense"))  # HF's own path is right there
