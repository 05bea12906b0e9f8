"""Helpers shared by the real loading paths (``Family.load_pretrained``)."""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from finetune.errors import UserError
from finetune.families.base import FullSize, ModelSpec
from finetune.weights.dtypes import keeps_fp32
from finetune.weights.fp8 import Fp8Unsupported, fill, fp8_layer_names, load_fp8_pretrained


class QuantizationUnavailable(UserError, RuntimeError):
    """Quantised frozen weights were asked for where bitsandbytes cannot run them."""


def cache_root(family: str) -> Path:
    """Where ``family`` keeps files it converts once (an official checkpoint as a diffusers
    folder): ``$FINETUNE_CACHE/<family>``, default ``~/.cache/finetune/<family>``."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / family


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


def from_subfolders(spec: ModelSpec, **parts: type | tuple[type, torch.dtype]) -> dict[str, Any]:
    """Each ``subfolder=cls`` of ``spec.pretrained`` at ``spec.revision`` by ``cls.from_pretrained``,
    in the order given: models (diffusers or transformers) in ``spec.dtype``, or in the dtype paired
    with their class (``vae=(AutoencoderKLWan, torch.float32)``); tokenizers, processors,
    schedulers and guiders as saved. Returns {subfolder: loaded}."""
    out = {}
    for subfolder, part in parts.items():
        cls, dtype = part if isinstance(part, tuple) else (part, spec.dtype)
        kwargs: dict[str, Any] = dict(subfolder=subfolder, revision=spec.revision)
        if issubclass(cls, diffusers.ModelMixin):
            kwargs["torch_dtype"] = dtype
        elif issubclass(cls, transformers.PreTrainedModel):
            kwargs["dtype"] = dtype
        out[subfolder] = cls.from_pretrained(spec.pretrained, **kwargs)
    return out


def load_transformer(cls: type, spec: ModelSpec, subfolder: str = "transformer", **kwargs) -> torch.nn.Module:
    """The frozen transformer ``cls`` (a diffusers model class) of ``spec``: bitsandbytes-quantised
    for int8/nf4 (``from_pretrained``), read tensor by tensor into fp8 block weights for fp8 (host
    memory never holds the full-precision state dict), plain ``from_pretrained`` otherwise.
    ``kwargs`` go to ``from_pretrained``. Raises QuantizationUnavailable (bitsandbytes without
    CUDA) and finetune.weights.fp8.Fp8Unsupported."""
    if spec.quantization == "fp8":
        return load_fp8_pretrained(cls, spec.pretrained, subfolder, spec.dtype, spec.revision)
    return cls.from_pretrained(spec.pretrained, subfolder=subfolder, revision=spec.revision, torch_dtype=spec.dtype,
                               quantization_config=bnb_quantization_config(spec), **kwargs)


# ---------------------------------------------------------------------------- random full-size weights

# Values of random weights: one seeded pool of standard normal numbers, each tensor a window of it
# at an offset from its name (repeated past the end), scaled per tensor. Drawing fresh numbers for
# a 14B model would take minutes on a CPU; a window copy takes about as long as reading a file.
_POOL_SIZE = 1 << 22


@functools.lru_cache(maxsize=1)
def _pool() -> torch.Tensor:
    return torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(20261204))


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A deterministic random value for parameter ``key``: ones for norm weights, zeros for biases,
    else normal with std 1/sqrt(fan in) (0.02 for vectors), which keeps a deep random model's
    activations finite in bf16."""
    out = torch.empty(shape, dtype=dtype)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return out.zero_()
    if len(shape) <= 1 and "norm" in key.lower():
        return out.fill_(1.0)
    n = out.numel()
    fan_in = n // shape[0] if len(shape) >= 2 and shape[0] else 0
    std = fan_in ** -0.5 if fan_in else 0.02
    pool = _pool()
    start = zlib.crc32(key.encode()) % _POOL_SIZE
    window = torch.cat([pool[start:], pool[:start]]) * std
    flat = out.view(-1)
    for i in range(0, n, _POOL_SIZE):  # cast window by window: no float32 copy of a whole large tensor
        m = min(_POOL_SIZE, n - i)
        flat[i:i + m].copy_(window[:m])
    return out


def _empty(full: FullSize) -> torch.nn.Module:
    """``full.cls`` from ``full.config`` with its parameters on the meta device and its buffers
    (rotary tables, position ids: computed, not loaded) built for real, as loading builds it."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if hasattr(full.cls, "config_class") and hasattr(full.cls, "_from_config"):  # transformers
            return full.cls._from_config(full.cls.config_class(**full.config))
        return full.cls.from_config(full.config)


def random_module(full: FullSize, dtype: torch.dtype, quantization: str = "none") -> torch.nn.Module:
    """``full`` (a component's class and full-size config) with random weights (:func:`random_tensor`),
    loaded tensor by tensor exactly as ``finetune.weights.fp8.load_fp8_pretrained`` loads a
    checkpoint: cast to ``dtype`` (float32 where ``from_pretrained`` keeps it), the block linears
    quantised to fp8 as they arrive for ``quantization="fp8"``; frozen, in eval mode. Tied
    parameters stay tied. Raises Fp8Unsupported for fp8 on a model without block linears."""
    model = _empty(full)
    targets = set(fp8_layer_names(model)) if quantization == "fp8" else set()
    if quantization == "fp8" and not targets:
        raise Fp8Unsupported(f"{full.cls.__name__} has no nn.Linear layers in repeated blocks to store in fp8 "
                             f"(set model.quantization=none)")
    slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, attr))

    def keep(key: str) -> bool:
        return keeps_fp32(model, key, dtype)

    def tensors():
        unique = list(model.named_parameters())  # one name per parameter: tied ones once
        for key, p in unique:
            yield key, random_tensor(key, tuple(p.shape), torch.float32 if keep(key) else dtype)
        for key, p in unique:  # the other places a tied parameter sits get the loaded one
            module_name, _, attr = key.rpartition(".")
            loaded = model.get_submodule(module_name)._parameters[attr]
            for module, slot in slots.get(id(p), []):
                module._parameters[slot] = loaded

    fill(model, tensors(), dtype, targets, what=f"{full.cls.__name__} with random weights", keep_fp32=keep)
    return model.eval().requires_grad_(False)
