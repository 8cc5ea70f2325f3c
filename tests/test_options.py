"""Training options: optimizer names and settings, min-LR cosine and WSD schedules, run names, kernels."""

from __future__ import annotations

import math

import pytest
import torch

from distsft.config import optim, schedules
from distsft.errors import SpecError
from distsft.config.spec import validate

BASE = {"model": {"name_or_path": "m"}, "data": {"train_files": ["t.jsonl"]}}


def _spec(train=None, **sections):
    return validate({**BASE, "train": train or {}, **sections})


# --------------------------------------------------------------------------- optimizers

def test_optimizer_names_are_transformers_optimizer_names():
    from transformers.training_args import OptimizerNames
    assert set(optim.OPTIMIZERS) == {o.value for o in OptimizerNames}
    assert len(optim.OPTIMIZERS) == len(set(optim.OPTIMIZERS))


def test_unknown_optimizer_exits_2_listing_the_valid_names():
    with pytest.raises(SpecError) as e:
        _spec({"optim": "adamw8bit"})
    msg = str(e.value)
    assert "train.optim" in msg and "'adamw8bit'" in msg
    for name in ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"):
        assert name in msg
    with pytest.raises(SpecError, match="optim_target_modules"):
        _spec({"optim": "galore_adamw"})


def test_optimizer_defaults_and_bounds():
    t = _spec().train
    assert (t.optim, t.adam_beta1, t.adam_beta2, t.adam_epsilon) == ("adamw_torch", 0.9, 0.999, 1e-8)
    with pytest.raises(SpecError, match="train.adam_beta2"):
        _spec({"adam_beta2": 1.0})
    with pytest.raises(SpecError, match="train.adam_epsilon"):
        _spec({"adam_epsilon": 0})


def test_an_optimizer_whose_package_is_missing_is_a_spec_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lomo_optim" else real(n, *a))
    with pytest.raises(SpecError, match="pip install lomo-optim"):
        optim.check_available("lomo")
    optim.check_available("adamw_8bit")  # bitsandbytes is installed here
    optim.check_available("adamw_torch")
    assert optim.required_package("adamw_torch_8bit")[0] == "torchao"
    assert optim.required_package("paged_adamw_8bit")[0] == "bitsandbytes"
    assert optim.required_package("sgd") is None


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"])
def test_spec_reaches_hf_optimizer_and_it_steps_on_cpu(tmp_path, name):
    """The names and Adam settings go through SFTConfig to the optimizer HF builds; the 8-bit ones are
    bitsandbytes' own (the paged variant falls back to ordinary memory on CPU) and keep 8-bit states."""
    from transformers import Trainer
    from trl import SFTConfig
    from distsft.train.arguments import option_args
    spec = _spec({"optim": name, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6, "learning_rate": 1e-3},
                 output_dir=str(tmp_path))
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-3, **option_args(spec))
    assert args.optim == name and args.run_name == tmp_path.name
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if "adam" in name:
        assert kwargs["betas"] == (0.8, 0.95) and kwargs["eps"] == 1e-6
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 64))  # >= 4096 values: bitsandbytes quantizes its states
    opt = cls([p], **kwargs)
    before = p.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert not torch.equal(before, p.detach())
    if name.endswith("8bit"):
        assert cls.__module__.startswith("bitsandbytes")
        assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["state2"].dtype == torch.uint8


# --------------------------------------------------------------------------- schedules

def _stepped(spec, total, warmup):
    """The LR each optimizer step runs at, stepping HF's scheduler with distsft's kwargs as training does."""
    from transformers import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.train.learning_rate)
    sched = get_scheduler(spec.train.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=schedules.scheduler_kwargs(spec.train, total))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, opt.param_groups[0]["lr"]


def test_cosine_with_min_lr_ends_at_ratio_times_peak():
    spec = _spec({"lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.1, "learning_rate": 1e-4})
    assert schedules.scheduler_kwargs(spec.train, 100) == {"min_lr_rate": 0.1}
    lrs = schedules.lr_curve(spec, 100, 10)
    stepped, after_last = _stepped(spec, 100, 10)
    assert lrs == pytest.approx(stepped, rel=1e-12, abs=0)
    assert lrs[0] == 0 and lrs[10] == pytest.approx(1e-4)
    assert after_last == pytest.approx(1e-5)  # the final learning rate is ratio × peak
    assert min(lrs[10:]) > 1e-5 and lrs[-1] == pytest.approx(1e-5, rel=1e-2)
    # Without a ratio: 0.1 (the usual eta_min = 0.1 × eta_max)
    assert schedules.scheduler_kwargs(_spec({"lr_scheduler_type": "cosine_with_min_lr"}).train, 10) == {"min_lr_rate": 0.1}


def test_warmup_stable_decay_holds_the_peak_then_decays_over_decay_ratio():
    spec = _spec({"lr_scheduler_type": "warmup_stable_decay", "decay_ratio": 0.2, "min_lr_ratio": 0.05,
                  "learning_rate": 2e-4, "warmup_ratio": 0.1})
    kw = schedules.scheduler_kwargs(spec.train, 100)
    assert kw == {"num_decay_steps": 20, "min_lr_ratio": 0.05, "decay_type": "cosine"}
    lrs = schedules.lr_curve(spec, 100, 10)
    stepped, after_last = _stepped(spec, 100, 10)
    assert lrs == pytest.approx(stepped, rel=1e-12, abs=0)
    assert set(lrs[10:81]) == {2e-4}  # stable: steps 11..81 at the peak
    assert lrs[81] < 2e-4 and all(a > b for a, b in zip(lrs[81:], lrs[82:]))  # decaying over the last 20
    assert after_last == pytest.approx(0.05 * 2e-4)
    assert schedules.decay_steps(1000, 0.1) == 100


def test_schedule_options_are_checked():
    with pytest.raises(SpecError, match="min_lr_ratio applies to"):
        _spec({"min_lr_ratio": 0.1})  # cosine (to zero) takes no floor
    with pytest.raises(SpecError, match="decay_ratio applies to"):
        _spec({"lr_scheduler_type": "cosine_with_min_lr", "decay_ratio": 0.1})
    with pytest.raises(SpecError, match="exceed 1"):
        _spec({"lr_scheduler_type": "warmup_stable_decay", "warmup_ratio": 0.5, "decay_ratio": 0.6})
    with pytest.raises(SpecError, match="train.lr_scheduler_type"):
        _spec({"lr_scheduler_type": "reduce_lr_on_plateau"})


def test_lr_plot_title_names_the_floor(tmp_path):
    from distsft.observe import plots
    spec = _spec({"lr_scheduler_type": "cosine_with_min_lr", "min_lr_ratio": 0.2, "learning_rate": 1e-4})
    assert schedules.final_lr_note(spec.train) == ", min 0.2 × peak"
    assert plots.lr_schedule(spec, 50, 5) == schedules.lr_curve(spec, 50, 5)
    assert plots.lr_schedule_png(spec, 50, 5, tmp_path / "lr.png").exists()


# --------------------------------------------------------------------------- PEFT keys, run identity, kernels

def test_peft_options_need_an_adapter():
    with pytest.raises(SpecError, match="peft.use_dora needs peft.method"):
        _spec(peft={"use_dora": True})
    p = _spec(peft={"method": "lora", "use_dora": True, "use_rslora": True, "modules_to_save": "lm_head",
                    "exclude_modules": ["q_proj"]}).peft
    assert p.modules_to_save == ["lm_head"] and p.exclude_modules == ["q_proj"]


def test_run_identity_keys():
    lg = _spec(logging={"run_name": "lr3e-4_r16", "wandb_entity": "team", "wandb_tags": "sweep"}).logging
    assert (lg.run_name, lg.wandb_entity, lg.wandb_tags) == ("lr3e-4_r16", "team", ["sweep"])
    for bad in ("a/b", "../up", "has space", ""):
        with pytest.raises(SpecError, match="logging.run_name"):
            _spec(logging={"run_name": bad})
    from distsft.rundir import run_name
    assert run_name(_spec(output_dir="runs/exp7")) == "exp7"


def test_liger_without_cuda_is_a_spec_error_before_any_rank_starts(tmp_path):
    """launcher.prepare runs before any rank starts (its SpecError is the CLI's exit 2)."""
    import helpers as h
    from distsft.runtime import hardware
    from distsft.launch import local as launcher
    from distsft.config.spec import load_spec
    assert not hardware.cuda_info()[0], "this test checks the CPU path"
    spec = load_spec(h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), ["model.use_liger_kernel=true"])
    with pytest.raises(SpecError, match="use_liger_kernel: true needs a CUDA GPU"):
        launcher.ready_for_ranks(spec, cuda=False)
    hardware.check_kernels(False)


def test_kernel_options_reach_sftconfig(tmp_path):
    from trl import SFTConfig
    from distsft.train.arguments import option_args
    spec = _spec({"torch_compile": True}, model={"name_or_path": "m", "use_liger_kernel": True},
                 output_dir=str(tmp_path / "o"))
    opts = option_args(spec)
    assert opts["torch_compile"] is True and opts["use_liger_kernel"] is True
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **{**opts, "use_liger_kernel": False})
    assert args.torch_compile and math.isclose(args.adam_beta2, 0.999)


def test_resuming_with_another_optimizer_is_refused():
    from distsft.checkpoint.resume import check_resume_compatible
    from distsft.plan.batch import batch_for
    spec = _spec({"optim": "adamw_torch", "global_batch_size": 8})
    from distsft.checkpoint.store import Marker
    marker = Marker(step=1, global_batch_size=8, seed=42, optim="adamw_8bit")
    with pytest.raises(SpecError, match="train.optim=adamw_8bit"):
        check_resume_compatible(marker, spec, batch_for(spec))
    check_resume_compatible(Marker(step=1, global_batch_size=8, seed=42, optim="adamw_torch"), spec, batch_for(spec))
    check_resume_compatible(Marker(step=1, global_batch_size=8, seed=42), spec, batch_for(spec))  # older checkpoints
