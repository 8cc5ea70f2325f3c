"""Drops explained: each reason with its count and the first rows (issue 24)."""

from __future__ import annotations

import numpy as np

from distsft.data import drops


def test_counts_merge_in_order_and_keep_the_first_rows() -> None:
    wheres = [f"f.jsonl:{i}" for i in range(1, 11)]
    a = {"overlong": drops.count(np.array([i in (1, 4) for i in range(10)]), wheres)}
    b = {"overlong": drops.count(np.array([True] * 3 + [False] * 7), [f"g.jsonl:{i}" for i in range(1, 11)]),
         "no_loss": drops.count(np.zeros(10, dtype=bool), wheres)}
    total = drops.merge(drops.merge({}, a), b)
    assert total == {"overlong": {"count": 5, "first": ["f.jsonl:2", "f.jsonl:5", "g.jsonl:1"]}}


def test_lines_and_explain_name_reason_count_and_rows() -> None:
    stats = {"max_length": 64, "num_examples": 1, "num_dropped": 299,
             "drops": {"no_loss": {"count": 299, "first": ["d.jsonl:1", "d.jsonl:2", "d.jsonl:3"]}}}
    (line,) = drops.lines(stats, "last")
    assert line.startswith("299 dropped: no loss-carrying token within the first data.max_length=64 tokens")
    assert "assistant_turns: last" in line and line.endswith("e.g. d.jsonl:1, d.jsonl:2, d.jsonl:3")
    why = drops.explain(stats)
    assert "1 of 300 examples kept" in why and "d.jsonl:1" in why and "data.max_length" in why
    assert drops.explain({"drops": {}}) == "" and drops.lines({}) == []


def test_dropped_parts_names_system_tools_and_reasoning() -> None:
    from types import SimpleNamespace as NS
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    assert drops.dropped_parts(msgs, tools, "user: hi assistant: yo", []) == ["system", "tools"]
    assert drops.dropped_parts(msgs, tools, "Be brief. get_weather hi yo", [NS(reasoning_dropped=True)]) == ["reasoning"]
    assert drops.dropped_parts(msgs, None, "Be brief. hi yo", [NS(reasoning_dropped=False)]) == []
    (line,) = drops.left_out_lines({"system": 3, "tools": 0}, 4, "chat template X")
    assert "leaves out the system message" in line and line.endswith("3 of 4 conversations")
