"""A quiet, honest console: a healthy run prints distsft's lines, every real warning and every error.

What is dropped is noise that says nothing about the run: bitsandbytes' note that an optional CPU
kernel package (`kernels`) is not installed (printed by every rank at import, also when nothing is
quantized), and transformers' progress bars for loading weights and writing shards (two per save, on
every rank). Installed in every process before those libraries are imported: logging filters and
progress-bar switches only, nothing is imported here.
"""

from __future__ import annotations

import logging

# (logger, start of the message) pairs that are dropped; anything else on those loggers still prints.
_NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),)


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet() -> None:
    for name, prefix in _NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in log.filters):
            log.addFilter(_Drop(prefix))


def no_progress_bars() -> None:
    """transformers' bars (loading weights, writing model shards) on every rank; datasets' too."""
    import datasets
    import transformers
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
