"""The plan says what an eval set without eval_steps does, and names the drops behind too few rows
(issue 24)."""

from __future__ import annotations

import pytest

from distsft.config.spec import validate
from distsft.errors import SpecError
from distsft.plan.report import make_plan

STATS = {"num_rows": 2, "num_examples": 2, "num_tokens": 100, "num_loss_tokens": 50, "packing_efficiency": 0.5,
         "drops_explained": " (2 of 300 examples kept; 298 dropped: longer than data.max_length=64; e.g. d.jsonl:1)"}


def _spec(data: dict, train: dict | None = None):
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["t.jsonl"], **data},
                     "train": {"per_device_train_batch_size": 1, "global_batch_size": 4, **(train or {})}})


@pytest.mark.parametrize("data, says", [({"val_set_size": 0.1}, "data.val_set_size"),
                                        ({"eval_files": ["e.jsonl"]}, "the eval sets")])
def test_an_eval_set_without_eval_steps_is_evaluated_at_the_end_and_the_plan_says_which(data, says) -> None:
    (w,) = [w for w in make_plan(_spec(data)).warnings if "eval_steps" in w]
    assert w.startswith(says) and "evaluated once, at the end of training" in w
    assert not [w for w in make_plan(_spec(data, {"eval_steps": 10})).warnings if "eval_steps" in w]


def test_too_few_rows_names_the_drops() -> None:
    with pytest.raises(SpecError) as exc:
        make_plan(_spec({}), STATS)
    msg = str(exc.value)
    assert "2 rows (after packing), fewer than one global batch of 4 (2 of 300 examples kept; 298 dropped" in msg
    assert "d.jsonl:1" in msg
