"""`plan` is the first command users run: exact (data it cannot read for a reason the user can fix is
exit 2 naming data.sources[i], the path and the row) and quiet (no third-party noise; no DeepSpeed,
bitsandbytes or PEFT imported on the way)."""

import json
import subprocess
import sys

import pytest

import helpers as h

NOISE = ("Setting accelerator to CPU", "gemm_4bit_forward", "Retrying in", "kernels-community", "Traceback")


def _quiet(p: subprocess.CompletedProcess) -> None:
    for n in NOISE:
        assert n not in p.stdout + p.stderr, (n, p.stdout[-2000:], p.stderr[-2000:])


def test_plan_render_and_help_print_no_third_party_noise(tmp_path):
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    p = h.run("plan", spec, check=True)
    _quiet(p)
    assert p.stderr.strip() == "", p.stderr
    _quiet(h.run("render", spec, "--out", tmp_path / "r", check=True))
    for args in (["--help"], ["plan", "--help"], ["init", "--help"]):
        _quiet(h.run(*args, check=True))


def test_the_plan_path_imports_no_deepspeed_bitsandbytes_or_peft(tmp_path):
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    code = f"""
import sys
from distsft.cli import app
try:
    app(["plan", {str(spec)!r}, "--json"])
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted(m for m in ("deepspeed", "bitsandbytes", "peft", "trl") if m in sys.modules)
print("HEAVY", heavy)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=h.env(), cwd=h.ROOT,
                       timeout=300)
    assert "HEAVY []" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def test_help_and_the_cli_import_no_torch():
    code = "import sys; import distsft.cli; print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=h.env(), cwd=h.ROOT)
    assert "TORCH False False" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("row,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}), "wizard"),
])
def test_unreadable_local_data_is_exit_2_naming_source_path_and_row(tmp_path, row, needle):
    bad = tmp_path / "bad.jsonl"
    good = h.TRAIN.read_text().splitlines()[0]
    bad.write_text(good + "\n" + row + "\n")
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    text = spec.read_text().replace(f"train_files: {h.TRAIN}", f"sources:\n    - path: {h.TRAIN}\n    - path: {bad}")
    spec.write_text(text)
    p = h.run("plan", spec)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "data.sources[1]" in p.stderr and f"{bad}:2" in p.stderr and needle in p.stderr, p.stderr


def test_a_missing_local_file_is_exit_2(tmp_path):
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    spec.write_text(spec.read_text().replace(str(h.TRAIN), str(tmp_path / "nope.jsonl")))
    p = h.run("plan", spec)
    assert p.returncode == 2 and "data.train_files[0]" in p.stderr and "nope.jsonl" in p.stderr, p.stderr


def test_a_hub_source_offline_is_not_read_and_exit_0(tmp_path):
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    spec.write_text(spec.read_text().replace(str(h.TRAIN), "someorg/some-dataset-not-cached"))
    p = h.run("plan", spec, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout)
    assert "someorg/some-dataset-not-cached" in d["data_note"]
    _quiet(p)
