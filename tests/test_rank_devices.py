"""Which device a rank uses, decided in the rank (runtime.devices), and the network checks before the
process group forms (runtime.fabric): GPU binding, CPU fallback, the 127.0.1.1 host name."""

from __future__ import annotations

import pytest

from distsft.errors import SpecError
from distsft.runtime import devices, dist, fabric


def test_device_index_follows_what_the_rank_sees():
    # Every GPU of the node visible (torchrun, no binding): the local rank.
    assert [devices.device_index(r, 8, 8) for r in range(8)] == list(range(8))
    # SLURM bound one GPU per task: each rank sees its own GPU as cuda:0 (cuda:LOCAL_RANK would not exist).
    assert [devices.device_index(r, 8, 1) for r in range(8)] == [0] * 8
    # Pairs of ranks sharing 4 visible GPUs evenly.
    assert [devices.device_index(r, 8, 4) for r in range(4, 8)] == [0, 1, 2, 3]
    with pytest.raises(SpecError, match="cannot tell which one"):
        devices.device_index(5, 6, 4)


def test_bound_rank_rebinds_local_rank_and_keeps_its_node_index(monkeypatch):
    """DeepSpeed reads LOCAL_RANK as the device; distsft's node-local rank (who builds the node's data
    cache) must survive the rebinding."""
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv(devices.NODE_LOCAL_RANK_ENV, raising=False)
    assert devices.bind_env(0, 0) == {}
    env = devices.bind_env(3, devices.device_index(3, 4, 1))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dist.env.cache_clear()
    try:
        e = dist.env()
        assert (e.local_rank, e.device_index, e.is_local_main) == (3, 0, False)
    finally:
        dist.env.cache_clear()


def test_cpu_variables_only_for_a_rank_without_gpu():
    assert devices.cpu_env("ddp", cuda=True) == {} == devices.cpu_env("deepspeed", cuda=True)
    assert devices.cpu_env("ddp", cuda=False) == {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "true"}
    assert "ACCELERATE_USE_CPU" not in devices.cpu_env("fsdp", cuda=False)


def test_allocated_gpus_are_recognised(monkeypatch):
    for k in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_NODE",
              "SLURM_GPUS_PER_TASK", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    assert not devices.requested_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not devices.requested_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert devices.requested_gpus()
    assert "training on the CPU" in devices.no_gpu_message("n1", "no driver")


def test_setup_rank_on_this_cpu_machine_sets_cpu_variables_for_ddp(monkeypatch, capsys):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the scheduler says GPU; this machine has none
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", devices.NODE_LOCAL_RANK_ENV):
        monkeypatch.delenv(k, raising=False)
    dist.env.cache_clear()
    try:
        assert devices.setup_rank("ddp") is False
    finally:
        dist.env.cache_clear()
    import os
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    assert "training on the CPU" in capsys.readouterr().err


FAKE_DNS = {"gpu-a": ["127.0.1.1"], "gpu-b": ["10.0.0.2"], "n1": ["127.0.0.1"], "n2": ["127.0.0.1"]}


def test_loopback_hostname_is_a_problem_only_across_machines():
    resolve = FAKE_DNS.__getitem__
    why = fabric.loopback_problem("gpu-a", ["gpu-b"], resolve=resolve)
    assert why and "127.0.1.1" in why and "gpu-b" in why
    # The local test cluster: every "node" is this machine, loopback is right.
    assert fabric.loopback_problem("n2", ["n1"], resolve=resolve) is None
    assert fabric.loopback_problem("gpu-b", ["gpu-a"], resolve=resolve) is None


def test_gloo_interface_set_when_unambiguous_else_named(monkeypatch):
    monkeypatch.delenv(fabric.GLOO_IFNAME, raising=False)
    monkeypatch.setattr(fabric, "_resolve", FAKE_DNS.__getitem__)
    assert fabric.check_gloo_interface("gpu-a", ["gpu-b"], candidates={"eth0": "10.0.0.1"}) == {
        fabric.GLOO_IFNAME: "eth0"}
    with pytest.raises(SpecError, match="GLOO_SOCKET_IFNAME.*eth0 .*ib0 "):
        fabric.check_gloo_interface("gpu-a", ["gpu-b"], candidates={"eth0": "10.0.0.1", "ib0": "192.168.0.1"})
    monkeypatch.setenv(fabric.GLOO_IFNAME, "ib0")
    assert fabric.check_gloo_interface("gpu-a", ["gpu-b"], candidates={}) == {}


def test_interfaces_lists_this_machines_non_loopback_addresses():
    for name, addr in fabric.interfaces().items():
        assert not addr.startswith("127."), (name, addr)


def test_failed_rendezvous_is_one_message_naming_the_address():
    msg = fabric.init_failure(RuntimeError("connect() timed out\nmore"), "node-001", 29500, "cuda:nccl,cpu:gloo")
    assert "node-001:29500" in msg and "GLOO_SOCKET_IFNAME" in msg and "NCCL_DEBUG=INFO" in msg
    assert "more" not in msg


def test_accelerate_use_cpu_from_the_shell_is_dropped_where_it_would_change_the_run(monkeypatch, capsys):
    """A leaked ACCELERATE_USE_CPU=true turned every DeepSpeed launch into plain DDP (it happened to this
    test suite); the rank now drops it with a notice, and keeps it only for CPU DDP, where it is needed."""
    import os
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert devices.forced_cpu("ddp", cuda=False) is None
    assert "deepspeed backend into plain DDP" in devices.forced_cpu("deepspeed", cuda=False)
    assert "this rank has a GPU" in devices.forced_cpu("ddp", cuda=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", devices.NODE_LOCAL_RANK_ENV):
        monkeypatch.delenv(k, raising=False)
    dist.env.cache_clear()
    try:
        assert devices.setup_rank("deepspeed") is False  # this machine: no GPU
    finally:
        dist.env.cache_clear()
    assert "ACCELERATE_USE_CPU" not in os.environ and os.environ["DS_ACCELERATOR"] == "cpu"
    assert "ignoring ACCELERATE_USE_CPU=true" in capsys.readouterr().err
