"""Memory estimate: parameter counts without weights, DeepSpeed's own numbers, the expected orderings."""

import pytest

from distsft.plan.memory import GIB, activation_bytes, estimate, lora_trainable_parameters, model_shape, trainable_states_bytes
from distsft.plan.report import make_plan
from distsft.config.spec import validate


def llama_config(path, **kw):
    from transformers import LlamaConfig
    defaults = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    LlamaConfig(**{**defaults, **kw}).save_pretrained(path)  # config.json only, no weights
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llama_config(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    """Llama-3.1-8B's shape, built on the meta device (no weights anywhere)."""
    path = llama_config(tmp_path_factory.mktemp("l8b"), hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    return model_shape(path)


def spec(model="m", peft=None, dist=None, train=None, gpus=8):
    return validate({"model": {"name_or_path": model}, "data": {"train_files": ["a.jsonl"], "max_length": 2048},
                     "peft": peft or {}, "train": {"per_device_train_batch_size": 2, "bf16": True, **(train or {})},
                     "distributed": {"gpus_per_node": gpus, **(dist or {})}})


def ds(stage, offload_optimizer=False, offload_params=False):
    d = {"backend": "deepspeed", "zero_stage": stage}
    if offload_optimizer:
        d["offload_optimizer"] = True
    if offload_params:
        d["offload_params"] = True
    return d


def test_counts_match_a_real_model(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM
    real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny))
    shape = model_shape(tiny)
    assert shape.num_parameters == sum(p.numel() for p in real.parameters())
    assert shape.largest_layer_parameters == 512 * 64  # the embedding (= lm_head here)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 2, 512)
    assert len(shape.linear_layers) == 2 * 7 and not any(n == "lm_head" for n, _, _ in shape.linear_layers)


def test_tied_embeddings_counted_once(tmp_path):
    untied = model_shape(llama_config(tmp_path / "a"))
    tied = model_shape(llama_config(tmp_path / "b", tie_word_embeddings=True))
    assert untied.num_parameters - tied.num_parameters == 512 * 64


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_count_matches_peft(tiny, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny)),
                           LoraConfig(r=8, target_modules=targets))
    peft_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_trainable_parameters(model_shape(tiny), 8, targets) == peft_count


def test_committed_tiny_model(tiny_model_dir):
    if not (tiny_model_dir / "config.json").exists():
        pytest.skip("examples/tiny-llama not present")
    e = estimate(spec(str(tiny_model_dir), gpus=2))
    assert e["num_parameters"] > 0 and e["total_gb"] > 0


def test_unreadable_model_gives_none(tmp_path):
    assert model_shape(str(tmp_path / "missing")) is None
    assert estimate(spec(str(tmp_path / "missing"))) is None
    assert estimate(spec("nobody/not-a-model-xyz")) is None  # offline: no hub call by default
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert model_shape(str(tmp_path / "bad")) is None


def test_full_ft_ordering_at_world_8(llama8b):
    t = estimate(spec(), shape=llama8b)["per_stage_gb"]
    assert t["zero3"] < t["zero2"] < t["zero1"] <= t["ddp"]
    assert t["zero1+offload_opt"] < t["zero1"]
    assert t["zero2+offload_opt"] < t["zero2"]
    assert t["zero3+offload_all"] < t["zero3+offload_opt"] < t["zero3"]


def test_table_entry_equals_the_spec_estimate(llama8b):
    table = estimate(spec(), shape=llama8b)["per_stage_gb"]
    for label, d in [("ddp", {}), ("zero2", ds(2)), ("zero3+offload_all", ds(3, True, True))]:
        assert estimate(spec(dist=d), shape=llama8b)["total_gb"] == table[label]


def test_more_gpus_less_memory_under_zero(llama8b):
    for d in (ds(1), ds(2), ds(3)):
        assert estimate(spec(dist=d, gpus=8), shape=llama8b)["model_states_gb"] > \
            estimate(spec(dist=d | {"gpus_per_node": 8, "nodes": 2}, gpus=8), shape=llama8b)["model_states_gb"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_below_full_and_qlora_below_lora(llama8b, stage):
    d = ds(stage) if stage else {}
    full = estimate(spec(dist=d), shape=llama8b)
    lora = estimate(spec(peft={"method": "lora"}, dist=d), shape=llama8b)
    assert lora["total_gb"] < full["total_gb"]
    assert lora["trainable_parameters"] < full["trainable_parameters"] == full["num_parameters"]
    qlora = estimate(spec(peft={"method": "qlora"}, dist=d), shape=llama8b)
    assert qlora["total_gb"] < lora["total_gb"]  # sharded QLoRA (ZeRO-3, FSDP2) included
    assert qlora["per_stage_gb"]["fsdp"] < qlora["per_stage_gb"]["ddp"]


def test_lora_ddp_numbers(llama8b):
    """Frozen bf16 base at 2 bytes/param plus 16 bytes per adapter parameter."""
    e = estimate(spec(peft={"method": "lora", "r": 16}), shape=llama8b)
    adapters = lora_trainable_parameters(llama8b, 16, "all-linear")
    assert e["trainable_parameters"] == adapters == 41_943_040
    assert e["model_states_gb"] == round((2 * llama8b.num_parameters + 16 * adapters) / GIB, 2)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeed(llama8b, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    cpu, gpu = estimate_zero2_model_states_mem_needs(llama8b.num_parameters, 8, 1, cpu_offload=offload)
    e = estimate(spec(dist=ds(2, offload)), shape=llama8b)
    assert e["model_states_gb"] == round(gpu / GIB, 2)
    assert e["cpu_gb"] == round(cpu / GIB, 2)


@pytest.mark.parametrize("offload_optimizer, offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_matches_deepspeed(llama8b, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        llama8b.num_parameters, llama8b.largest_layer_parameters, 8, 2, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params, zero_init=True)
    s = spec(dist=ds(3, offload_optimizer, offload_params) | {"nodes": 2})
    e = estimate(s, make_plan(s), shape=llama8b)
    assert e["model_states_gb"] == round(gpu / GIB, 2)
    assert e["cpu_gb"] == round(cpu / GIB, 2)


def test_ddp_is_16_bytes_per_param(llama8b):
    e = estimate(spec(), shape=llama8b)
    assert e["model_states_gb"] == round(16 * llama8b.num_parameters / GIB, 2)
    assert e["cpu_gb"] == 0


def test_zero1_between_ddp_and_zero2():
    p = 1_000_000
    ddp, _ = trainable_states_bytes(p, 0, 0, False, False, 8, 1)
    z1, _ = trainable_states_bytes(p, 0, 1, False, False, 8, 1)
    z2, _ = trainable_states_bytes(p, 0, 2, False, False, 8, 1)
    assert z1 == 4 * p + 16 * p // 8  # replicated 16-bit weights and grads, partitioned fp32 states
    assert z2 < z1 < ddp


def test_activations(llama8b):
    no_ckpt = activation_bytes(llama8b, 2, 2048, False, 2)
    ckpt = activation_bytes(llama8b, 2, 2048, True, 2)
    assert ckpt < no_ckpt
    logits = 2 * 2048 * 128256 * (2 + 4)
    assert no_ckpt - logits == 2 * (activation_bytes(llama8b, 1, 2048, False, 2) - logits // 2)
    assert activation_bytes(llama8b, 2, 2048, False, 4) > no_ckpt  # fp32 activations
    e1 = estimate(spec(train={"gradient_checkpointing": True}), shape=llama8b)
    e2 = estimate(spec(train={"gradient_checkpointing": False}), shape=llama8b)
    assert e1["activations_gb"] < e2["activations_gb"] and e1["model_states_gb"] == e2["model_states_gb"]
    assert e1["total_gb"] == pytest.approx(e1["model_states_gb"] + e1["activations_gb"], abs=0.011)


def test_checkpoint_size_per_rank_and_node_for_each_backend(llama8b):
    """One save of full fine-tuning at 2 nodes × 8: DDP puts everything on rank 0 (fp32 weights + Adam,
    12 bytes/param); ZeRO-3 and FSDP2 write 12 bytes/param spread over all ranks, nothing gathered."""
    e = estimate(spec(dist={"backend": "fsdp", "nodes": 2}, gpus=8), shape=llama8b)
    c, n = e["checkpoint"], llama8b.num_parameters
    assert c["backend"] == "fsdp"
    table = c["per_backend"]
    assert table["ddp"]["per_rank_gb"] == pytest.approx(12 * n / GIB, rel=1e-3)
    assert table["fsdp"]["per_rank_gb"] == pytest.approx(12 * n / 16 / GIB, rel=1e-3)
    assert table["fsdp"]["per_node_gb"] == pytest.approx(12 * n / 2 / GIB, rel=1e-3)
    assert table["zero3"] == table["fsdp"]
    assert table["zero3"]["per_rank_gb"] < table["zero2"]["per_rank_gb"] < table["ddp"]["per_rank_gb"]
    lora = estimate(spec(peft={"method": "lora"}, dist={"backend": "fsdp"}), shape=llama8b)["checkpoint"]
    assert lora["per_rank_gb"] < c["per_rank_gb"] / 50  # the adapter and its moments only
