"""A quiet, honest console: a healthy run prints distsft's lines, every real warning and every error.

What is dropped is noise that says nothing about the run and asks nothing of the user: bitsandbytes'
note that an optional CPU kernel package (`kernels`) is not installed (printed by every rank at import,
also when nothing is quantized); accelerate's "Gradient accumulation steps mismatch ... Using
DeepSpeed's value" (HF Trainer accumulates itself and hands accelerate 1; DeepSpeed's value is the
planned one); torch's deprecation of `all_gather_into_tensor`, which DeepSpeed calls; and
transformers' progress bars for loading weights and writing shards (two per save, on every rank). Installed in every process before those libraries are imported: logging filters and
progress-bar switches only, nothing is imported here.
"""

from __future__ import annotations

import logging
import warnings
from distsft.runtime import envvars

# (logger, text in the message) pairs that are dropped; anything else on those loggers still prints.
_NOISE = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
          ("accelerate.accelerator", "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,"))


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return self.prefix not in str(record.msg)


def quiet() -> None:
    for name, prefix in _NOISE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in log.filters):
            log.addFilter(_Drop(prefix))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def no_progress_bars() -> None:
    """transformers' bars (loading weights, writing model shards) on every rank; datasets' too."""
    import datasets
    import transformers
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def configure_logging(is_main: bool) -> None:
    """The libraries' logging for this process: ranks other than 0 print only warnings and errors
    (prefixed by dist.warn); no progress bars anywhere; no tokenizers thread pool forked under us."""
    import datasets
    import transformers
    if not is_main:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
    no_progress_bars()
    envvars.tokenizers_single_threaded()


def literal(label: str, style: str, msg: str) -> object:
    """A styled label followed by a message printed literally: text in the message that looks like rich
    markup (a row's `file[row 3]`, a role named `[/INST]`) reaches the user as it is, instead of being
    eaten or crashing the print with a MarkupError."""
    from rich.text import Text
    return Text.assemble((label, style), " ", msg)
