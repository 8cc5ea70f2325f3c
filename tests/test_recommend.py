"""The recommendation table (plan.recommend): size classes, what init picks, what plan warns about,
and the ZeRO byte accounting plan uses instead of importing DeepSpeed (plan.zero_states)."""

import itertools

import pytest

from distsft.config.spec import validate
from distsft.plan import recommend, zero_states

BASE = {"model": {"name_or_path": "m"}, "data": {"train_files": ["a.jsonl"]}}


def spec(train=None, peft=None):
    return validate({**BASE, "train": train or {}, "peft": peft or {}})


@pytest.mark.parametrize("n,label", [(135e6, "1B-3B"), (1.2e9, "1B-3B"), (4.9e9, "1B-3B"), (5e9, "7B-13B"),
                                     (14.7e9, "7B-13B"), (20.9e9, "30B-70B"), (70e9, "30B-70B"),
                                     (117e9, "30B-70B")])
def test_size_classes_cover_every_size(n, label):
    assert recommend.size_class(int(n)).label == label


@pytest.mark.parametrize("n", [0.5e9, 1.5e9, 3e9, 7e9, 8e9, 14e9, 27e9, 32e9, 70e9, 120e9])
@pytest.mark.parametrize("method", ["none", "lora", "qlora"])
def test_pick_sits_inside_its_own_ranges(n, method):
    n = int(n)
    c = recommend.size_class(n)
    p = recommend.pick(n, method, dp_world=8)
    lo, hi = recommend.learning_rate_range(n, method)
    assert lo <= p.learning_rate <= hi
    assert c.effective_batch[0] <= p.effective_batch <= c.effective_batch[1]
    assert p.effective_batch % 8 == 0
    assert c.epochs[0] <= p.epochs <= c.epochs[1]
    assert c.warmup_ratio[0] <= p.warmup_ratio <= c.warmup_ratio[1]
    assert c.weight_decay[0] <= p.weight_decay <= c.weight_decay[1]
    assert (p.lora_r, p.lora_alpha) == ((16, 32) if method != "none" else (None, None))
    # and plan does not warn about what init picked
    s = spec({"learning_rate": p.learning_rate, "num_train_epochs": p.epochs, "warmup_ratio": p.warmup_ratio,
              "weight_decay": p.weight_decay, "global_batch_size": p.effective_batch},
             {"method": method})
    assert recommend.warnings(s, n, p.effective_batch) == []


def test_lora_learning_rate_is_the_lora_range_at_every_size():
    for n in (1e9, 8e9, 70e9):
        assert recommend.learning_rate_range(int(n), "lora") == (1e-4, 2e-4)
    assert recommend.learning_rate_range(int(8e9), "none") == (1e-5, 5e-5)


def test_effective_batch_stays_in_range_when_it_can_and_says_so_when_not():
    assert recommend.effective_batch(32, 64, 8) == 64
    assert recommend.effective_batch(32, 64, 24) == 48
    assert recommend.effective_batch(16, 32, 128) == 128  # 128 GPUs: one row each is the least
    p = recommend.pick(int(1e9), "none", dp_world=128)
    assert p.effective_batch == 128 and "smallest multiple" in p.why["global_batch_size"]


def test_warnings_name_the_range_and_never_raise():
    s = spec({"learning_rate": 1e-3, "num_train_epochs": 10, "warmup_ratio": 0.2, "weight_decay": 0.5,
              "max_grad_norm": 5.0, "lr_scheduler_type": "constant"})
    w = recommend.warnings(s, int(8e9), 512)
    text = "\n".join(w)
    for part in ("train.learning_rate=0.001 is outside the recommended 1e-05-5e-05", "7B-13B",
                 "effective batch 512", "32-64", "train.num_train_epochs=10", "2-3",
                 "train.warmup_ratio=0.2", "0.03-0.1", "train.weight_decay=0.5", "0.01",
                 "train.max_grad_norm=5", "lr_scheduler_type=constant"):
        assert part in text, text
    # the same learning rate is fine for LoRA
    lora = spec({"learning_rate": 1.5e-4, "global_batch_size": 64}, {"method": "lora"})
    assert not any("learning_rate" in x for x in recommend.warnings(lora, int(8e9), 64))


def test_epochs_are_not_judged_when_max_steps_decides():
    s = spec({"num_train_epochs": 10, "max_steps": 100, "global_batch_size": 64})
    assert not any("epochs" in x for x in recommend.warnings(s, int(8e9), 64))


def test_unknown_size_checks_only_the_bounds_that_hold_at_every_size():
    assert recommend.warnings(spec({"learning_rate": 3e-5}), None, 10_000) == []
    assert "at any model size" in recommend.warnings(spec({"learning_rate": 3e-3}), None, 16)[0]


def test_zero_byte_accounting_equals_deepspeeds_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    for params, largest, gpn, nodes in itertools.product((10**6, 7_615_616_512, 70_553_706_496),
                                                         (0, 10**5, 1_050_673_152), (1, 2, 8), (1, 4)):
        for off in (False, True):
            assert zero_states.zero2(params, gpn, nodes, cpu_offload=off) == \
                estimate_zero2_model_states_mem_needs(params, gpn, nodes, cpu_offload=off)
            for off_p, init in itertools.product((False, True), (False, True)):
                assert zero_states.zero3(params, largest, gpn, nodes, off, off_p, init) == \
                    estimate_zero3_model_states_mem_needs(params, largest, gpn, nodes, cpu_offload=off,
                                                          cpu_offload_params=off_p, zero_init=init)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                  "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                                  "warmup_stable_decay"])
@pytest.mark.parametrize("total,warmup", [(100, 10), (37, 0), (5, 5)])
def test_plan_lr_curve_equals_hf_schedulers(name, total, warmup):
    """config.schedules.lr_curve computes HF's schedules in plain Python (plan must not import
    transformers.optimization, which imports PEFT and bitsandbytes); it must equal what training builds."""
    import torch
    from transformers import get_scheduler

    from distsft.config import schedules
    s = spec({"learning_rate": 3e-4, "lr_scheduler_type": name, "warmup_ratio": 0.0,
              **({"min_lr_ratio": 0.2} if name in schedules.MIN_LR_SCHEDULERS else {})})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                          scheduler_specific_kwargs=schedules.scheduler_kwargs(s.train, total))
    want = [3e-4 * sched.lr_lambdas[0](i) for i in range(total)]
    assert schedules.lr_curve(s, total, warmup) == pytest.approx(want, rel=1e-12, abs=1e-18)
