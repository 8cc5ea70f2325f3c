"""Issue 19 item 15, the rank side: `bf16: auto` counts native bf16 only, decided without touching a GPU
(torch.cuda.is_bf16_supported() counts V100/T4's emulation and, to find out, allocates a tensor on the
current device -- GPU 0 before set_device -- in every rank); TF32 on for Ampere+.

No GPU exists here, so torch.cuda's queries are replaced by a device of a given compute capability, and
the two calls that would allocate on it fail the test if made."""
from __future__ import annotations

import pytest
import torch

from distsft.runtime import hardware


@pytest.fixture
def fake_gpu(monkeypatch):
    def use(major: int) -> tuple[bool, bool, int]:
        def touches_device(*a, **k):
            raise AssertionError("a device query that allocates on the current device (GPU 0 before set_device)")
        monkeypatch.setattr(hardware, "gpu_driver_present", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", touches_device)
        monkeypatch.setattr(torch.cuda, "current_device", touches_device)
        hardware.cuda_info.cache_clear()
        return hardware.cuda_info()
    yield use
    hardware.cuda_info.cache_clear()


def test_emulated_bf16_is_not_bf16(fake_gpu):
    assert fake_gpu(7) == (True, False, 7)  # V100: bf16 only emulated -> auto trains fp32, not slow bf16


def test_ampere_has_native_bf16(fake_gpu):
    assert fake_gpu(8) == (True, True, 8)


def test_native_bf16_and_tf32_follow_the_capability():
    assert [hardware.native_bf16(m) for m in (6, 7, 8, 9, 10)] == [False, False, True, True, True]
    assert hardware.native_bf16(7, rocm=True)
    assert hardware.tf32_arg(True, 8) is True and hardware.tf32_arg(True, 9) is True
    assert hardware.tf32_arg(True, 7) is None and hardware.tf32_arg(False, 0) is None
