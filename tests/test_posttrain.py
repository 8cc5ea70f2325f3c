"""posttrain units on CPU, no training: the streamed safetensors writer against safetensors' own reader,
the streaming LoRA merge against PEFT's merge_and_unload, the QLoRA merge against the 4-bit model,
end-of-turn tokens of real chat templates, lm-eval metric names, checkpoint resolution, the hub
stand-in round trip and the refusals that are exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from distsft.errors import SpecError
from distsft.posttrain import merge, shards, source
from distsft.posttrain.eval import metric_records
from distsft.posttrain.turns import end_of_turn_ids, eos_list

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "tests" / "assets" / "tokenizers"


# ----------------------------------------------------------------------------------------- shards

def test_parse_size() -> None:
    assert shards.parse_size("2GB") == 2 * 10**9 and shards.parse_size("64MiB") == 64 * 2**20
    assert shards.parse_size("500kb") == 500_000 and shards.parse_size(1234) == 1234
    with pytest.raises(ValueError):
        shards.parse_size("lots")


def test_streamed_shards_read_back_by_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 48, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
               "c.ids": torch.arange(10), "d.half": torch.randn(3, 5, 2, generator=g).half(),
               "e.scalar": torch.tensor(3.5), "f.big": torch.randn(200, 100, generator=g)}
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    names = shards.write_model(tmp_path, entries, lambda n: tensors[n], max_bytes=10_000)
    # a (12 KB) alone, then b..e, then f (80 KB) alone: a tensor over the limit gets its own shard.
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = {}
    for f in names:
        back.update(load_file(tmp_path / f))
        assert (tmp_path / f).stat().st_size <= 80_000 + 1024  # a shard: <= max, or one big tensor + header
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n


def test_shard_refuses_a_tensor_other_than_planned(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="planned"):
        shards.write_shard(tmp_path / "x.safetensors", [("w", (2, 2), torch.float32)], lambda n: torch.zeros(2, 3))
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------------------- merge

def _tiny_peft(tmp_path: Path, tiny_model_dir: Path, **lora: object):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], **lora)
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    return peft, out


@pytest.mark.parametrize("rslora", [False, True])
def test_streaming_merge_equals_peft_merge(tmp_path: Path, tiny_model_dir: Path, rslora: bool) -> None:
    from safetensors.torch import load_file
    peft, adapter_dir = _tiny_peft(tmp_path, tiny_model_dir, use_rslora=rslora)
    expected = {k: v.detach().clone() for k, v in peft.merge_and_unload().state_dict().items()}
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    assert merge.needs_peft_merge(list(adapter), cfg) is None
    base = source.SafetensorsReader(source.weight_files(tiny_model_dir))
    merged = merge.MergedWeights(base, adapter, cfg, torch.float32)
    changed = 0
    for name, shape, dtype in merged.entries():
        got = merged(name)
        assert got.shape == shape and got.dtype == dtype
        assert torch.allclose(got, expected[name], atol=1e-6), name
        changed += not torch.equal(got, base.read([name])[name])
    assert changed == 6  # q, v, down in both layers


def test_dora_goes_to_peft_merge(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert merge.needs_peft_merge(["x.lora_A.weight"], {"modules_to_save": ["lm_head"]}) == "modules_to_save"
    peft, adapter_dir = _tiny_peft(tmp_path, tiny_model_dir, use_dora=True)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert merge.needs_peft_merge(["x.lora_A.weight"], cfg) == "DoRA"
    x = torch.tensor([[1, 5, 9, 33, 70, 101]])
    with torch.no_grad():
        ref = peft(input_ids=x).logits
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain.load_state_dict(merge.peft_merged_state(tiny_model_dir, adapter_dir, torch.float32))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, ref, atol=1e-5)


def test_qlora_merge_is_the_4bit_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The merge onto the NF4 round trip reproduces the model QLoRA trained (4-bit base + adapter) within
    bf16's tolerance, and closer than a merge onto the original full-precision weights."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        base4 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, quantization_config=q,
                                                     device_map={"": "cpu"})
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 4-bit does not run here: {exc}")
    torch.manual_seed(0)
    model = get_peft_model(base4, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base = source.SafetensorsReader(source.weight_files(tiny_model_dir))
    x = torch.tensor([[1, 5, 9, 33, 70, 101, 7, 12]])
    with torch.no_grad():
        ref = model(input_ids=x).logits.float()

    def logits(quantized: set[str] | None) -> torch.Tensor:
        m = merge.MergedWeights(base, adapter, cfg, torch.bfloat16, quantized)
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        plain.load_state_dict({n: m(n) for n, _, _ in m.entries()})
        with torch.no_grad():
            return plain(input_ids=x).logits.float()

    quantized = merge.quantized_linears(tiny_model_dir)
    assert "model.layers.0.mlp.up_proj.weight" in quantized and "lm_head.weight" not in quantized
    on_nf4 = float((logits(quantized) - ref).abs().max())
    on_original = float((logits(None) - ref).abs().max())
    assert on_nf4 <= 5e-2 * max(1.0, float(ref.abs().max()))
    assert on_nf4 < on_original


# ----------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("name,eot", [("llama3_1", "<|eot_id|>"), ("qwen3", "<|im_end|>"),
                                      ("gemma3", "<end_of_turn>")])
def test_end_of_turn_of_real_templates(name: str, eot: str) -> None:
    from transformers import AutoTokenizer
    if not (TOKENIZERS / name).is_dir():
        pytest.skip("tests/assets/tokenizers not fetched (make test-assets)")
    tok = AutoTokenizer.from_pretrained(TOKENIZERS / name)
    assert end_of_turn_ids(tok, tok.chat_template) == [tok.convert_tokens_to_ids(eot)]


def test_eos_list_merges_without_repeats() -> None:
    assert eos_list(2, [4, 2], None, [7]) == [2, 4, 7]


def test_metric_records_names() -> None:
    res = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1},
                       "arc": {"acc,none": 0.25, "acc_norm,none": 0.3, "acc_stderr,none": 0.01}}}
    assert metric_records(res) == {"eval/gsm8k/exact_match_strict-match": 0.5, "eval/arc/acc": 0.25,
                                   "eval/arc/acc_norm": 0.3}


def test_peft_and_full_names_from_any_layout() -> None:
    assert source.peft_name("model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert source.peft_name("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight") == \
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert source.peft_name("base_model.model.model.layers.1.mlp.down_proj.base_layer.weight") is None
    assert source.full_name("model.model.norm.weight") == "model.norm.weight"


# ----------------------------------------------------------------------------------------- refusals

def _fake_run(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, object]:
    from distsft.config.spec import validate
    run = tmp_path / "run"
    run.mkdir()
    spec = validate({"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train_files": ["x.jsonl"]},
                     "output_dir": str(run)})
    return run, spec


def test_resolve_refuses_missing_incomplete_and_unfinished(tmp_path: Path, tiny_model_dir: Path) -> None:
    run, spec = _fake_run(tmp_path, tiny_model_dir)
    with pytest.raises(SpecError, match="no final model"):
        source.resolve(run, "final", spec)
    ck = run / "checkpoint-4"
    shutil.copytree(tiny_model_dir, ck)
    with pytest.raises(SpecError, match="incomplete"):
        source.resolve(run, "4", spec)
    with pytest.raises(SpecError, match="checkpoint-9 does not exist; complete checkpoints: none"):
        source.resolve(run, "9", spec)
    with pytest.raises(SpecError, match="not final, best or a step"):
        source.resolve(run, "latest", spec)
    (ck / "distsft_complete.json").write_text("{}")
    got = source.resolve(run, "4", spec)
    assert (got.step, got.layout, got.adapter, got.name) == (4, "hf", False, "4")
    with pytest.raises(SpecError, match="no best checkpoint"):
        source.resolve(run, "best", spec)


def test_base_model_not_found() -> None:
    with pytest.raises(SpecError, match="base model"):
        source.base_model_dir("/nonexistent/model")
    with pytest.raises(SpecError, match="base model"):
        source.base_model_dir("nobody-xyz/not-a-cached-model")


def test_export_out_dir_rules(tmp_path: Path) -> None:
    from distsft.posttrain.export import prepare_out, torch_dtype
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SpecError, match="run directory"):
        prepare_out(run, run, overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(SpecError, match="not empty"):
        prepare_out(out, run, overwrite=False)
    prepare_out(out, run, overwrite=True)
    assert out.is_dir() and not any(out.iterdir())
    with pytest.raises(SpecError, match="--dtype"):
        torch_dtype("int8")


def test_hub_refusals() -> None:
    from distsft.posttrain.hub import check_repo, check_token
    with pytest.raises(SpecError, match="HF_TOKEN"):
        check_token(None)
    with pytest.raises(SpecError, match="repository id"):
        check_repo("no-namespace")
    with pytest.raises(SpecError, match="repository id"):
        check_repo("bad//name")


def test_push_round_trip_through_the_standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's real client against tests/hub_standin.py (a local stand-in: no hub here)."""
    import importlib
    from hub_standin import HubStandIn
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# m\n")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "config.json").write_text("{}")
    with HubStandIn("tok123") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        import huggingface_hub.constants
        importlib.reload(huggingface_hub.constants)
        try:
            from distsft.posttrain.hub import push
            push(folder, "me/m", "tok123", private=False, say=lambda s: None)
            with pytest.raises(Exception, match="401"):
                push(folder, "me/m", "wrong-token", say=lambda s: None)
        finally:
            monkeypatch.undo()
            importlib.reload(huggingface_hub.constants)
    repo = hub.repos["me/m"]
    assert repo["private"] is False
    assert repo["files"] == {f.name: f.read_bytes() for f in folder.iterdir()}
    assert any(r["path"].endswith("objects/batch") for r in hub.requests)  # the weights went by LFS


# ----------------------------------------------------------------------------------------- spec + after_training

def _spec(**eval_section: object):
    from distsft.config.spec import validate
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["x.jsonl"]},
                     "eval": eval_section, "slurm": {"partition": "gpu", "account": "acct"}})


def test_eval_section_of_the_spec() -> None:
    s = _spec(tasks=["tiny_arith"], include_path="examples/eval_tasks", after_training=True)
    assert (s.eval.tasks, s.eval.apply_chat_template, s.eval.after_training) == (["tiny_arith"], None, True)
    with pytest.raises(SpecError, match=r"eval\.after_training needs eval\.tasks"):
        _spec(after_training=True)
    with pytest.raises(SpecError, match="eval.limit"):
        _spec(tasks=["x"], limit=3)


def test_after_training_runs_where_the_readme_says() -> None:
    from distsft.launch.after import eval_job_parameters, local_command
    assert local_command(Path("/r"), 4, cuda=True)[1:] == [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "4",
        "-m", "distsft.posttrain.eval", "/r", "final"]
    assert local_command(Path("/r"), 2, cuda=False)[1:] == ["-m", "distsft.posttrain.eval", "/r", "final"]
    p = eval_job_parameters(_spec(tasks=["x"], after_training=True), True, "4242")
    assert p["nodes"] == 1 and p["ntasks_per_node"] == 1 and p["gpus_per_node"] == 1
    assert p["additional_parameters"]["dependency"] == "afterok:4242"
    assert (p["partition"], p["account"]) == ("gpu", "acct")
