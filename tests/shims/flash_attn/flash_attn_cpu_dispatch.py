"""TEST-ONLY: let transformers 5.24 dispatch attn_implementation="flash_attention_2" to the flash-attn
stand-in in this directory on a machine without CUDA.

transformers refuses FA2 without CUDA in three places, all fed by one function and one table:
`is_flash_attn_2_available()` (utils.import_utils; it returns False unless `is_torch_cuda_available()`)
and FLASH_ATTENTION_COMPATIBILITY_MATRIX[2] in modeling_flash_attention_utils (its
"general_availability_check" and its "supported_devices", which `_flash_attn_can_dispatch` walks for a
model whose weights are on the CPU). `install()` makes both say "available on cpu" -- nothing else of
transformers changes, so from the model's attention layers down to the flash-attn call (unpadding,
varlen with cu_seqlens, sliding windows, softcap, target dtype) the code that runs is the real one.

`install()` patches modules already imported and hooks the import of those that are not, so it works
from sitecustomize (subprocesses: ranks started by `distsft run`) and in a test process alike.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

IMPORT_UTILS = "transformers.utils.import_utils"
FA_UTILS = "transformers.modeling_flash_attention_utils"


def _available(kernels_fallback_ok: bool = False) -> bool:
    return True


def _cpu() -> bool:
    return True


def _patch(module: Any) -> None:
    if module.__name__ == IMPORT_UTILS:
        module.is_flash_attn_2_available = _available
        utils = sys.modules.get("transformers.utils")
        if utils is not None and hasattr(utils, "is_flash_attn_2_available"):
            utils.is_flash_attn_2_available = _available
    elif module.__name__ == FA_UTILS:
        module.is_flash_attn_2_available = _available
        entry = module.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]
        entry["general_availability_check"] = _available
        if all(name != "cpu" for _, name in entry["supported_devices"]):
            entry["supported_devices"] = (*entry["supported_devices"], (_cpu, "cpu"))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs `_patch` right after the module's own code, before anything can import names from it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in (IMPORT_UTILS, FA_UTILS):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    # `transformers.utils` copies the function at its own import, so patch the package attribute too.
    for name in (IMPORT_UTILS, FA_UTILS):
        if name in sys.modules:
            _patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
