"""Helpers shared by the real loading paths (``Family.load_pretrained``)."""

from __future__ import annotations

import diffusers
import torch

from finetune.errors import UserError
from finetune.families.base import ModelSpec


class QuantizationUnavailable(UserError, RuntimeError):
    """Quantised frozen weights were asked for where bitsandbytes cannot run them."""


def bnb_quantization_config(spec: ModelSpec) -> diffusers.BitsAndBytesConfig | None:
    """bitsandbytes settings for the frozen transformer, or None for ``quantization: none``.
    Raises ValueError for an unknown mode and QuantizationUnavailable without CUDA."""
    if spec.quantization == "none":
        return None
    if spec.quantization not in ("int8", "nf4"):
        raise ValueError(f"model.quantization={spec.quantization!r} is not one of 'none', 'int8', 'nf4', 'fp8'")
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(f"model.quantization={spec.quantization!r} needs a CUDA GPU (bitsandbytes); "
                                      "set model.quantization=none to train on this machine")
    if spec.quantization == "int8":
        return diffusers.BitsAndBytesConfig(load_in_8bit=True)
    # LoRA layers and activations compute in spec.dtype on top of the 4-bit base weights.
    return diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=spec.dtype)


def check_quantization(spec: ModelSpec) -> None:
    """Fail fast, before any download or weights: an unknown ``model.quantization``, or
    bitsandbytes without CUDA. Raises ValueError or QuantizationUnavailable."""
    if spec.quantization != "fp8":
        bnb_quantization_config(spec)


def load_transformer(cls: type, spec: ModelSpec, subfolder: str = "transformer", **kwargs) -> torch.nn.Module:
    """The frozen transformer ``cls`` (a diffusers model class) of ``spec``: bitsandbytes-quantised
    for int8/nf4 (``from_pretrained``), read tensor by tensor into fp8 block weights for fp8 (host
    memory never holds the full-precision state dict), plain ``from_pretrained`` otherwise.
    ``kwargs`` go to ``from_pretrained``. Raises QuantizationUnavailable (bitsandbytes without
    CUDA) and finetune.memory.fp8.Fp8Unsupported."""
    if spec.quantization == "fp8":
        from finetune.memory.fp8 import load_fp8_pretrained

        return load_fp8_pretrained(cls, spec.pretrained, subfolder, spec.dtype, spec.revision)
    return cls.from_pretrained(spec.pretrained, subfolder=subfolder, revision=spec.revision, torch_dtype=spec.dtype,
                               quantization_config=bnb_quantization_config(spec), **kwargs)
