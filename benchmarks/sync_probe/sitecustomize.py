"""Benchmark instrument (host_syncs.py), active only in rank processes with DISTSFT_SYNC_PROBE=DIR set:
counts every point where the host waits, per optimizer step, by who asked for it.

  read        a tensor's value read on the host: .item(), .tolist(), bool(t), int(t), float(t) (on a GPU
              each one waits for the device; on this CPU machine the same calls are counted). Not
              .numpy(): it refuses a CUDA tensor, so it never waits for a device
  collective  a blocking torch.distributed collective (async_op=True ones are counted apart, as "async");
              reading the result of the collective just made on that tensor is the same wait, not a second
  owner       the innermost caller outside torch: "distsft" (src/distsft) or the library's package name
Steps are delimited by a global optimizer step post-hook; each rank writes DIR/rank<R>.json at exit."""
import os

if os.environ.get("DISTSFT_SYNC_PROBE") and os.environ.get("RANK") is not None:
    import atexit
    import collections
    import json
    import sys
    import threading

    import torch
    import torch.distributed as tdist
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _state = threading.local()
    _step = [0]
    _counts = collections.defaultdict(collections.Counter)  # step -> Counter[(owner, kind, site)]
    _TORCH = os.path.dirname(torch.__file__)

    def _owner():
        f = sys._getframe(2)
        while f is not None and (f.f_code.co_filename.startswith(_TORCH) or f.f_code.co_filename == __file__):
            f = f.f_back
        if f is None:
            return "?", "?"
        path = f.f_code.co_filename
        site = f"{os.path.basename(path)}:{f.f_code.co_name}"
        if "/distsft/" in path:
            return "distsft", site
        if "site-packages/" in path:
            return path.split("site-packages/", 1)[1].split("/", 1)[0], site
        return "other", site

    def _record(kind):
        owner, site = _owner()
        _counts[_step[0]][(owner, kind, site)] += 1

    def _read(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if not getattr(_state, "inside", False):
                _state.inside = True
                try:
                    if id(self) in getattr(_state, "collected", ()):
                        _state.collected.discard(id(self))
                    else:
                        _record("read")
                finally:
                    _state.inside = False
            return original(self, *a, **k)
        setattr(torch.Tensor, name, wrapper)

    for _name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        _read(_name)

    def _collective(name):
        original = getattr(tdist, name)

        def wrapper(*a, **k):
            _record("async" if k.get("async_op") else "collective")
            if not k.get("async_op"):
                _state.collected = {id(x) for x in a if isinstance(x, torch.Tensor)}
            return original(*a, **k)
        setattr(tdist, name, wrapper)

    for _name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                  "barrier", "all_gather_object", "broadcast_object_list", "gather", "reduce"):
        _collective(_name)

    def _post_step(opt, args, kwargs):
        _step[0] += 1

    register_optimizer_step_post_hook(_post_step)

    def _dump():
        out = {str(s): [[o, k, site, n] for (o, k, site), n in c.items()] for s, c in _counts.items()}
        path = os.path.join(os.environ["DISTSFT_SYNC_PROBE"], f"rank{os.environ['RANK']}.json")
        with open(path, "w") as f:
            json.dump({"steps": _step[0], "counts": out}, f)

    atexit.register(_dump)
