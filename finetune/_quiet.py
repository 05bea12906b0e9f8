"""Third-party warnings that say nothing to a user of this tool, held back where they arise.

Our programs print their own lines (``error:``, ``warning:``, ``note:``, progress bars) and a
third-party warning only when it changes what the user gets. The known harmless ones are held
back at their source, each named below with the reason it is harmless here:

- log records: a filter on the one logger that emits the record, matching the start of that one
  message (installed when ``finetune`` is imported, before the libraries that log them load);
- ``warnings.warn`` calls: :func:`held_back` around the one call that triggers them.

``-v``/``--verbose`` on every entry script (:func:`finetune.cli.add_verbose_flag`), or ``VIDEO_LORA_VERBOSE=1``
in the environment (which child processes inherit), lets everything through.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

VERBOSE_ENV = "VIDEO_LORA_VERBOSE"


@dataclass(frozen=True)
class Noise:
    """A log record held back: ``logger`` emits it, its message matches ``message`` (a regular
    expression, from the start); ``why`` says why it is harmless here."""

    logger: str
    message: str
    why: str


LOG_NOISE: tuple[Noise, ...] = (
    Noise("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
          "bitsandbytes tries to fetch an optional faster CPU 4-bit kernel from the Hub when it is imported "
          "(diffusers imports it); it falls back to its own kernel, and only AdamW8bit and nf4 on a GPU use it"),
    Noise("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/",
          "the same optional bitsandbytes CPU kernel, looked up with the Hub in offline mode: the kernels package "
          "notes that it cannot check the publisher; nothing is downloaded or run because of it"),
    Noise("diffusers.quantizers.torchao.torchao_quantizer", r"Unable to import `torchao` Tensor objects",
          "diffusers' torchao quantizer registers torchao classes for torch.load; this tool neither uses that "
          "quantizer (fp8 is finetune.weights.fp8) nor torch.loads torchao checkpoints"),
    Noise("transformers.utils.import_utils",
          r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back",
          "without torchvision, transformers uses the PIL image processor, which is what that class name meant "
          "before transformers 5: the i2v image encoders get the preprocessing they were released with"),
    Noise("torchao", r"Failed to load .*\.so",
          "torchao's import tries each CUDA kernel library it ships (none open without CUDA); the weight-only fp8 "
          "storage used here needs none of them"),
    Noise("torchao.kernel.intmm", r"Warning: Detected no triton",
          "torchao's int8 matmul kernels need Triton; this tool does not call them"),
    Noise("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported",
          "torchao registers its enums with torch's pytree as older torch needed; a deprecation for torchao"),
    Noise("diffusers.guiders.guider_utils", r"Guiders are currently an experimental feature",
          "HunyuanVideo-1.5's pipeline builds its guidance from diffusers' guiders, whose API may change: a note "
          "for code that calls them, which ours pins through the diffusers version"),
)


def verbose() -> bool:
    """True when the user asked to see every warning (``-v`` or ``VIDEO_LORA_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool = True) -> None:
    """Let every warning through from now on, in this process and the ones it starts."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


class _HoldBack(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns``, unless verbose."""

    def __init__(self, patterns: list[re.Pattern]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def install() -> None:
    """Put the :data:`LOG_NOISE` filters on their loggers (once). Loggers exist before the
    modules that use them are imported, so this runs before diffusers or torchao load."""
    by_logger: dict[str, list[re.Pattern]] = {}
    for n in LOG_NOISE:
        by_logger.setdefault(n.logger, []).append(re.compile(n.message))
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HoldBack) for f in logger.filters):
            logger.addFilter(_HoldBack(patterns))


@contextmanager
def held_back(*messages: str, category: type[Warning] = UserWarning) -> Iterator[None]:
    """Hold back ``warnings.warn`` calls of ``category`` whose message starts with one of
    ``messages`` (regular expressions) while the block runs; everything shows when verbose. Only
    for warnings known to be harmless at the call it wraps: the caller says why in a comment."""
    if verbose():
        yield
        return
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield
