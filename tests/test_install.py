"""A reproducible install (issue 14, item 10): pyproject bounds every dependency below its next major
version, constraints.txt pins what the suite passes with, and make demo / make test / CI install with it."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_bounded_below_its_next_major_version() -> None:
    for req in _requirements():
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        upper = [Version(s.version) for s in req.specifier if s.operator == "<"]
        assert lower and upper, f"{req}: needs a lower and an upper bound"
        assert upper[0] == Version(f"{upper[0].major}") and upper[0].major >= 1, f"{req}: bound at a major version"


def test_constraints_pin_every_dependency_within_its_bounds_and_match_this_environment() -> None:
    pins = _constraints()
    assert "torch" not in pins and "distsft" not in pins  # torch: the Makefile's own step
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]  # CUDA-only
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in ("torch", "flash-attn"):  # machine-specific builds (flash-attn: CUDA only)
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside pyproject's {req}"
        assert Version(metadata.version(req.name)) == pins[name], f"{req.name}: this venv is not what was recorded"


def test_make_demo_make_test_and_ci_install_with_the_constraints() -> None:
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS\s*:?=\s*-c constraints.txt$", make, re.M)
    installs = [ln for ln in make.splitlines() if "pip install" in ln and "--upgrade pip" not in ln]
    assert installs and all(ln.count("$(CONSTRAINTS)") == ln.count("pip install") for ln in installs), installs
    assert re.search(r"^demo: setup$", make, re.M) and re.search(r"^test: setup-dev\b", make, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
