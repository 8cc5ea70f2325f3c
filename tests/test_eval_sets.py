"""Eval metrics over several eval sets, and the process group timeout the ranks are given."""

import math

import pytest

from distsft.train.backend import process_group_timeout_s
from distsft.config.spec import validate


def test_eval_loss_is_token_weighted_over_all_sets_and_each_set_is_logged():
    from distsft.train.trainer import eval_metrics
    m = eval_metrics({"val": (30.0, 10.0), "chat": (10.0, 40.0)})
    assert m["eval_loss"] == pytest.approx(40.0 / 50.0)  # not the mean of 3.0 and 0.25
    assert m["eval_val_loss"] == 3.0 and m["eval_chat_loss"] == 0.25 and m["eval_tokens"] == 50.0
    one = eval_metrics({None: (6.0, 3.0)})
    assert one == {"eval_loss": 2.0, "eval_tokens": 3.0}  # one set: no per-set key
    assert math.isnan(eval_metrics({"a": (0.0, 0.0), "b": (0.0, 0.0)})["eval_a_loss"])


def test_timeout_minutes_reaches_the_process_group():
    base = {"model": {"name_or_path": "m"}, "data": {"train_files": ["a.jsonl"]}}
    assert process_group_timeout_s(validate(base)) == 30 * 60
    spec = validate({**base, "distributed": {"backend": "deepspeed", "timeout_minutes": 90}})
    assert process_group_timeout_s(spec) == 90 * 60
    with pytest.raises(Exception, match="timeout_minutes"):
        validate({**base, "distributed": {"timeout_minutes": 0}})
    import inspect
    from distsft.train import arguments, recipe
    # TrainingArguments.ddp_timeout (accelerate: init_process_group for DDP, deepspeed.init_distributed for
    # DeepSpeed) and the recipe's own deepspeed.init_distributed call both get it
    assert "ddp_timeout=process_group_timeout_s(spec)" in inspect.getsource(arguments.sft_config)
    assert "timeout=datetime.timedelta(seconds=process_group_timeout_s(spec))" in inspect.getsource(
        recipe.training_arguments)
