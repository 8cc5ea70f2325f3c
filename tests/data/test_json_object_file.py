"""A JSON file holding one object is one record, or column-oriented records; never cut into messages
(issue 24: a one-record JSON object file got a misleading message)."""

from __future__ import annotations

import json

from distsft.data.sources import iter_records


def test_one_record_object_file(tmp_path) -> None:
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    f = tmp_path / "one.json"
    f.write_text(json.dumps(rec))
    assert list(iter_records(str(f), ["messages"])) == [(f"{f}[row 0]", rec)]
    g = tmp_path / "alpaca.json"
    g.write_text(json.dumps({"instruction": "a", "output": "b"}))
    assert [r for _, r in iter_records(str(g), [])] == [{"instruction": "a", "output": "b"}]


def test_column_oriented_object_file(tmp_path) -> None:
    f = tmp_path / "cols.json"
    f.write_text(json.dumps({"text": ["a", "b"], "id": [1, 2]}))
    assert [r for _, r in iter_records(str(f), [])] == [{"text": "a", "id": 1}, {"text": "b", "id": 2}]
    g = tmp_path / "msgs.json"  # a messages column: lists of lists
    g.write_text(json.dumps({"messages": [[{"role": "user", "content": "q"}], [{"role": "user", "content": "r"}]]}))
    assert len(list(iter_records(str(g), []))) == 2
