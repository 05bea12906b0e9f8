"""Where the text encoders run while the cache is built (``memory.text_encoder``).

  gpu   on the training device in the model dtype (the default)
  cpu   left in host memory: prompts encode slowly, but the accelerator never holds the encoder
  int8  on the device, block linears int8 with per-row scales (torchao weight-only)
  fp8   on the device, block linears e4m3 with per-row scales (the transformer's fp8 path)

The encoders load in full precision and are quantised after loading (unlike the transformer,
which is quantised while loading): they are read once, for the cache, and then released.
"""

from __future__ import annotations

import torch

from finetune.weights.fp8 import quantize_fp8

MODES = ("gpu", "cpu", "int8", "fp8")
# Components attributes that are text encoders (image encoders and the VAE are left alone).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def prepare_text_encoder(name: str, module: torch.nn.Module, mode: str) -> None:
    """Quantise text encoder ``module`` (Components attribute ``name``) in place for ``int8``/``fp8``;
    nothing for ``gpu``/``cpu``. Raises ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"memory.text_encoder={mode!r} is not one of {', '.join(MODES)}")
    if mode in ("int8", "fp8"):
        quantize_fp8(module, mode, what=f"memory.text_encoder={mode}: {name}")


def text_encoder_device(mode: str, device: torch.device | str) -> torch.device | str:
    """Where a text encoder lives while caching: the CPU for ``cpu``, else ``device``."""
    return "cpu" if mode == "cpu" else device
