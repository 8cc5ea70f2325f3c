"""Issue 19 items 1 and 11: which attention a rank asks transformers for.

* flash-attn is checked by importing it: a wheel built for another torch is found by `find_spec` but
  fails to import (an undefined symbol in flash_attn_2_cuda); `auto` then falls back to sdpa with a
  warning, an explicit flash_attention_2 exits 2 naming flash-attn.
* fp32 compute (`train.bf16: false`, fp32 weights) never gets flash attention: the kernel takes
  fp16/bf16 only.
The GPU itself cannot exist here: `cuda_major` stands for the compute capability the rank would read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import helpers as h
from distsft.errors import SpecError
from distsft.runtime.hardware import choose_attn

BROKEN = '''raise ImportError("/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
                  "_ZN3c104cuda9SetDeviceEi")
'''


def _broken_flash_attn(root):
    """What `pip install flash-attn` built against another torch leaves behind."""
    (root / "flash_attn").mkdir(parents=True)
    (root / "flash_attn" / "__init__.py").write_text(BROKEN)
    info = root / "flash_attn-2.8.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3\n")
    (info / "top_level.txt").write_text("flash_attn\n")
    return root


def test_fp32_compute_never_gets_flash_attention():
    warnings: list[str] = []
    assert choose_attn("auto", half=False, warn=warnings.append, cuda_major=9) == "sdpa"
    with pytest.raises(SpecError, match=r"train\.bf16"):
        choose_attn("flash_attention_2", half=False, cuda_major=9)
    assert choose_attn("eager", half=False, cuda_major=9) == "eager"


def test_without_cuda_auto_is_sdpa_and_an_explicit_request_says_why():
    assert choose_attn("auto", half=True, cuda_major=0) == "sdpa"
    with pytest.raises(SpecError, match="flash-attn"):
        choose_attn("flash_attention_2", half=True, cuda_major=0)  # not installed here


PROBE = textwrap.dedent("""
    import json
    from distsft.errors import SpecError
    from distsft.runtime.hardware import choose_attn
    warnings = []
    auto = choose_attn("auto", half=True, warn=warnings.append, cuda_major=9)
    try:
        choose_attn("flash_attention_2", half=True, cuda_major=9)
        explicit = None
    except SpecError as exc:
        explicit = str(exc)
    print(json.dumps({"auto": auto, "warnings": warnings, "explicit": explicit}))
""")


def test_a_flash_attn_that_does_not_import_is_found_by_importing_it(tmp_path):
    env = h.env()
    env["PYTHONPATH"] = os.pathsep.join([str(_broken_flash_attn(tmp_path / "site")), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["auto"] == "sdpa"
    assert len(r["warnings"]) == 1 and "flash-attn" in r["warnings"][0] and "undefined symbol" in r["warnings"][0]
    assert r["explicit"] and "flash-attn" in r["explicit"] and "undefined symbol" in r["explicit"]


def test_run_with_a_broken_flash_attn_exits_2_naming_it(tmp_path):
    """Before issue 19 the broken wheel passed `find_spec` and every rank failed later with "cannot load
    model.name_or_path"; now the launcher says so before any rank starts."""
    env = h.env()
    env["PYTHONPATH"] = os.pathsep.join([str(_broken_flash_attn(tmp_path / "site")), env.get("PYTHONPATH", "")])
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out")
    p = subprocess.run([*h.DISTSFT, "run", str(spec), "model.attn_implementation=flash_attention_2",
                        "train.bf16=true"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "flash-attn" in p.stderr and "undefined symbol" in p.stderr
    assert "Traceback" not in p.stderr
