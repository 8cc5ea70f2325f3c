"""Issue 24 end to end, through the `distsft` command: LLaMA-Factory and axolotl data trained as they are,
the trained template saved with the model and every checkpoint, an eval set without eval_steps
evaluated at the end; messages printed literally, drops explained, sanity on every source."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import helpers as h

PEERS = Path(__file__).resolve().parent / "data" / "peers"
NAMED = Path(__file__).resolve().parents[1] / "src" / "distsft" / "assets" / "chat_templates"


def _spec(path: Path, out: Path, data: str, train: str = "max_steps: 4", extra: str = "") -> Path:
    path.write_text(f"""
model:
  name_or_path: {h.TINY}
data:
{data}
  max_length: 512
train:
  per_device_train_batch_size: 2
  global_batch_size: 4
  learning_rate: 1.0e-3
  warmup_ratio: 0.0
  bf16: false
  {train}
logging:
  logging_steps: 1
checkpoint:
  save_steps: 2
output_dir: {out}
{extra}""")
    return path


def _prepare(spec: Path) -> subprocess.CompletedProcess:
    return h.run("prepare", spec, "--gpus", "1")


@pytest.mark.slow
def test_peer_datasets_train_and_the_template_travels_with_the_model(tmp_path) -> None:
    out = tmp_path / "out"
    # The spec sits next to its data, named relatively: resolved from the spec's directory.
    for f in PEERS.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    spec = _spec(tmp_path / "spec.yaml", out, """  chat_template: qwen2.5
  val_set_size: 2
  sources:
    - {dataset_info: dataset_info.json#glaive_toolcall_demo, count: 40}
    - {dataset_info: dataset_info.json#alpaca_demo, count: 40}
    - path: axolotl_chat.jsonl
      count: 40
      field_messages: conversations
      message_property_mappings: {role: from, content: value}
      roles: {assistant: [gpt, model], user: [human], system: [system]}""")
    p = h.run("run", spec, "--gpus", "1", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    qwen = (NAMED / "qwen2.5.jinja").read_text()
    assert (out / "chat_template.jinja").read_text() == qwen
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts and all((c / "chat_template.jinja").read_text() == qwen for c in ckpts)
    first = (out / "run.yaml").read_text().splitlines()[0]
    assert first.startswith("# chat template: data.chat_template: qwen2.5 (named template shipped with distsft)")
    # val_set_size without eval_steps: evaluated once, at the end, and said at the start
    evals = [r for r in h.metrics(out) if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 4
    assert "evaluated once, at the end of training" in p.stdout + p.stderr


def test_markup_in_messages_reaches_the_user_and_a_bad_role_is_exit_2(tmp_path) -> None:
    spec = _spec(tmp_path / "s.yaml", tmp_path / "o", f"""  sources:
    - {{path: {PEERS / 'markup_role.jsonl'}, format: sharegpt}}""")
    p = _prepare(spec)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "markup_role.jsonl:1: turn 1 has from='[/INST]'" in p.stderr
    assert "MarkupError" not in p.stderr and "Traceback" not in p.stderr
    # a JSON array file names rows as file[row N]; the console must not eat "[row 1]"
    rows = json.loads((PEERS / "glaive_toolcall_demo.json").read_text())
    rows[1]["conversations"][0]["from"] = "bot"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    spec = _spec(tmp_path / "s2.yaml", tmp_path / "o2", f"""  sources:
    - {{path: {bad}, formatting: sharegpt, columns: {{messages: conversations, tools: tools}}}}""")
    p = _prepare(spec)
    assert p.returncode == 2 and f"{bad}[row 1]: turn 0 has from='bot'" in p.stderr, p.stderr[-2000:]


def test_unknown_chat_template_is_exit_2_saying_what_was_expected(tmp_path) -> None:
    spec = _spec(tmp_path / "s.yaml", tmp_path / "o", f"  train_files: {h.TRAIN}\n  chat_template: chatlm")
    p = h.run("plan", spec, "--no-data")
    assert p.returncode == 2
    assert "data.chat_template" in p.stderr and "'chatlm'" in p.stderr and "chatml" in p.stderr
    assert "tokenizer directory" in p.stderr and "line" in p.stderr  # the spec's line


def test_drops_are_explained_with_reasons_and_rows(tmp_path) -> None:
    # Long multi-turn conversations cut at max_length: with assistant_turns: last the final answer is gone.
    rows = [{"messages": [m for k in range(40) for m in ({"role": "user", "content": f"question {k} " * 3},
                                                          {"role": "assistant", "content": f"answer {k} " * 3})]}
            for _ in range(6)] + [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    f = tmp_path / "long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(tmp_path / "s.yaml", tmp_path / "o", f"  train_files: {f}\n  assistant_turns: last")
    spec.write_text(spec.read_text().replace("max_length: 512", "max_length: 64"))
    p = _prepare(spec)
    # 1 example left, fewer rows than one global batch: the error names the drops that caused it
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    err = p.stderr
    assert "fewer than one global batch" in err and "1 of 7 examples kept" in err
    assert "6 dropped: no loss-carrying token within the first data.max_length=64 tokens" in err
    assert f"{f}:1, {f}:2, {f}:3" in err and "assistant_turns: last" in err


def test_a_template_that_leaves_out_the_system_message_says_so_with_a_count(tmp_path) -> None:
    rows = [{"messages": [{"role": "system", "content": f"You are assistant number {i}."},
                          {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
            for i in range(8)]
    f = tmp_path / "sys.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(tmp_path / "s.yaml", tmp_path / "o", f"  train_files: {f}\n  chat_template: mistral-v0.3\n  packing: false")
    p = _prepare(spec)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-2000:]
    line = "leaves out the system message"
    assert text.count(line) == 2  # warned once by the build, and once more in prepare's figures
    assert "8 of 8 conversations" in text and "mistral-v0.3" in text


@pytest.mark.slow
def test_sanity_steps_every_source_and_no_temp_folders_left(tmp_path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**h.env(), "TMPDIR": str(tmp)}
    spec = _spec(tmp_path / "s.yaml", tmp_path / "o", f"""  sources:
    - {{path: {h.TRAIN}}}
    - {{dataset_info: {PEERS / 'dataset_info.json'}#alpaca_demo, count: 30}}""")
    p = subprocess.run([*h.DISTSFT, "sanity", str(spec), "--gpus", "1", "--steps", "3"], capture_output=True,
                       text=True, timeout=900, env=env, cwd=h.ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("sanity: 3 steps on "))
    n = int(line.split("steps on ")[1].split(" examples")[0].replace(",", ""))
    assert 300 <= n <= 430 and "from " + str(PEERS / "alpaca_demo.json") in line  # ~400, both sources
    assert "data.sources[0]" in p.stdout and "data.sources[1]" in p.stdout  # examples from each, named
    assert "3 steps ran" in p.stdout
    assert not list(tmp.glob("distsft-sanity-*"))
    # a failure after the folder was made (a data error in the second source) removes it too
    spec.write_text(spec.read_text().replace("alpaca_demo, count: 30", "misnamed_column"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n')
    spec.write_text(spec.read_text().replace(f"{{dataset_info: {PEERS / 'dataset_info.json'}#misnamed_column}}",
                                             f"{{path: {broken}}}"))
    p = subprocess.run([*h.DISTSFT, "sanity", str(spec), "--gpus", "1", "--steps", "3"], capture_output=True,
                       text=True, timeout=900, env=env, cwd=h.ROOT)
    assert p.returncode == 2 and "broken.jsonl:1: message 1 has role 'bot'" in p.stderr, p.stderr[-2000:]
    assert not list(tmp.glob("distsft-sanity-*"))
