"""An export is verified, not assumed: reload it the way users will and compare it with the run.

1. Logits on a few training examples (the run's own packed rows) from the export, loaded with
   `from_pretrained` (+ PEFT for a kept adapter), against the checkpoint loaded independently of the
   export's code path: `from_pretrained` on the checkpoint's own files, or the whole state dict of a
   DCP / ZeRO checkpoint loaded into the model at once, or the adapter on its base through PEFT (QLoRA:
   on the 4-bit base through bitsandbytes, as it trained). Exact (max |diff| = 0) for fp32 weights
   copied as they are; within the dtype's tolerance otherwise (MERGE_TOL for a merge in fp32, whose
   W + BA rounds differently from the unmerged forward).
2. A reply to one chat prompt rendered with the training template, generated greedily with the
   export's own generation_config, must stop at the end-of-turn token: the reference model's greedy
   continuation, generated without any stop token, says where the turn ends; the export must end
   exactly there. A model that never ends its turn within the budget is reported, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distsft.posttrain import source

MERGE_TOL = 1e-4  # x max |logit|: fp32 rounding of a merged W + scale*B@A
DTYPE_TOL = {"float32": 0.0, "bfloat16": 5e-2, "float16": 1e-2}  # x max |logit|
MAX_NEW_TOKENS = 48
EXAMPLES, EXAMPLE_TOKENS = 3, 128


@dataclass
class Report:
    ok: bool = True
    lines: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)

    def fail(self, line: str) -> None:
        self.ok = False
        self.lines.append("MISMATCH " + line)


def reference_model(ckpt: source.Checkpoint, spec: Any, info: dict[str, Any]) -> Any:
    """The checkpoint as the run holds it, in fp32 (QLoRA: its 4-bit base), loaded without export code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if not ckpt.adapter:
        if ckpt.layout == "hf":
            return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=torch.float32)
        reader = source.model_reader(ckpt)
        config_dir = next(d for d in (ckpt.path, ckpt.run_dir, Path(spec.model.name_or_path))
                          if (d / "config.json").is_file())
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
        state = reader.read(list(reader.names()))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m not in _tied(model)]:
            raise RuntimeError(f"checkpoint state does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
    base = _base(Path(info["base_model"]), spec.peft.method == "qlora")
    if ckpt.layout == "hf":
        return PeftModel.from_pretrained(base, str(ckpt.path))
    cfg = source.adapter_config(ckpt, spec)
    known = set(LoraConfig.__dataclass_fields__)
    model = get_peft_model(base, LoraConfig(**{k: v for k, v in cfg.items() if k in known}))
    reader = source.adapter_reader(ckpt)
    set_peft_model_state_dict(model, reader.read(list(reader.names())))
    return model


def _tied(model: Any) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if not isinstance(keys, dict) else keys.keys())


def _base(path: Path, qlora: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from transformers import BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q,
                                                device_map={"": "cpu"})


def exported_model(out: Path, info: dict[str, Any]) -> Any:
    """The export as a user loads it: from_pretrained, in the dtype it was written in."""
    from transformers import AutoModelForCausalLM
    if info["kind"] != "adapter":
        return AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    import torch
    from peft import PeftModel
    from transformers import GenerationConfig
    base = _base(Path(info["base_model"]), qlora=False)
    model = PeftModel.from_pretrained(base, str(out)).to(getattr(torch, info["dtype"]))
    # PEFT keeps the base's generation_config; the one this export ships is the one to check (the card
    # says to load it: GenerationConfig.from_pretrained(PATH)).
    model.generation_config = GenerationConfig.from_pretrained(out)
    return model


def examples(spec: Any, tokenizer: Any) -> list[list[int]]:
    """The first few examples of the run's training data, as training tokenized them."""
    from distsft.data.split import prepare_split
    ds, _ = prepare_split(spec, tokenizer, "train")
    out: list[list[int]] = []
    for row in ds.select(range(min(len(ds), EXAMPLES))):
        out.append(list(row["input_ids"][:int(row["seq_lengths"][0])])[:EXAMPLE_TOKENS])
    return out


def tolerance(info: dict[str, Any], spec: Any) -> float:
    tol = DTYPE_TOL.get(info["dtype"], 5e-2)
    if info["kind"] == "merged" and tol == 0.0:
        tol = MERGE_TOL
    if spec.peft.method == "qlora" and info["kind"] == "adapter":
        tol = max(tol, DTYPE_TOL["bfloat16"])  # the base computes in bf16 in both
    return tol


def compare_logits(ref: Any, exp: Any, rows: list[list[int]], report: Report, tol: float) -> None:
    import torch
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            a = ref(input_ids=x).logits.float()
            b = exp(input_ids=x).logits.float()
            worst = max(worst, float((a - b).abs().max()))
            scale = max(scale, float(a.abs().max()))
    limit = tol * max(scale, 1.0)
    report.numbers.update(logits_max_abs_diff=worst, logits_max_abs=scale, tolerance=limit, examples=len(rows))
    line = (f"logits on {len(rows)} training examples: max |diff| {worst:.3g} "
            f"(max |logit| {scale:.3g}, allowed {limit:.3g}{', exact' if limit == 0 else ''})")
    if worst > limit:
        report.fail(line)
    else:
        report.lines.append("ok " + line)


def check_stop(ref: Any, exp: Any, tokenizer: Any, template: str, prompt: str, report: Report, exact: bool) -> None:
    import torch
    from transformers import GenerationConfig
    from distsft.data.chat import ChatRenderer
    from distsft.posttrain.turns import end_of_turn_ids, eos_list
    text = ChatRenderer(tokenizer, template).render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    from distsft.data.encode import OffsetEncoder
    text = OffsetEncoder(tokenizer).add_bos(text)[0]  # as training and its sample generations encode
    x = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    stops = eos_list(exp.generation_config.eos_token_id)  # what the export's users will stop on
    # Where the turn ends is the template's business, not the export's config (which is under test).
    turn_end = eos_list(end_of_turn_ids(tokenizer, template), tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else turn_end[0]
    with torch.no_grad():
        free = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=pad)
        ref_out = ref.generate(input_ids=x, generation_config=free)[0, x.shape[1]:].tolist()
        cfg = GenerationConfig(**{**exp.generation_config.to_diff_dict(), "max_new_tokens": MAX_NEW_TOKENS,
                                  "do_sample": False, "num_beams": 1, "pad_token_id": pad})
        got = exp.generate(input_ids=x, generation_config=cfg)[0, x.shape[1]:].tolist()
    end = next((i for i, t in enumerate(ref_out) if t in turn_end), None)
    reply = tokenizer.decode(got, skip_special_tokens=False)
    report.numbers.update(reply=reply, reply_tokens=len(got), turn_end=end, eos_token_id=stops)
    if end is None:
        report.lines.append(f"note: the model did not end its turn within {MAX_NEW_TOKENS} tokens (undertrained?); "
                            f"end-of-turn ids {turn_end}")
    stopped_at_end = bool(got) and got[-1] in turn_end and all(t not in turn_end for t in got[:-1])
    if end is not None and not stopped_at_end:
        report.fail(f"generation did not stop at the end-of-turn token {turn_end} (generation_config eos_token_id "
                    f"{stops}): {len(got)} tokens, reply {reply!r}")
    elif exact and end is not None and got != ref_out[:end + 1]:
        report.fail(f"generation: export {got[:end + 2]} != run {ref_out[:end + 1]} (reply {reply!r})")
    elif end is not None:
        report.lines.append(f"ok generation stops at end-of-turn after {len(got)} tokens: {reply!r}")


def verify(out: Path, info: dict[str, Any], spec: Any) -> Report:
    import torch
    from transformers import AutoTokenizer
    report = Report()
    ckpt = source.resolve(info["run_dir"], info["checkpoint"], spec)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    ref = reference_model(ckpt, spec, info).eval()
    exp = exported_model(out, info).eval()
    compare_logits(ref, exp, examples(spec, tokenizer), report, tolerance(info, spec))
    prompt = (list(spec.logging.generation_prompts) or ["What is 2 + 3?"])[0]
    exact = report.numbers.get("tolerance", 1.0) == 0.0
    check_stop(ref, exp, tokenizer, tokenizer.chat_template, prompt, report, exact)
    return report
