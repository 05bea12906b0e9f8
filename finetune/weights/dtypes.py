"""The dtype each parameter takes as a checkpoint loads: the load dtype, except the modules a model
keeps in float32 (diffusers' and transformers' ``_keep_in_fp32_modules`` rules). Loading
(``Family.load``, random full-size weights, fp8 loading) and the memory planner's counts both follow
these rules, so a built model holds what a loaded one holds."""

from __future__ import annotations

import torch


def keeps_fp32(model: torch.nn.Module, name: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``from_pretrained`` in ``dtype`` keeps parameter ``name`` in float32: diffusers
    keeps ``_keep_in_fp32_modules`` for any half dtype (Wan's time embedder and norms);
    transformers keeps ``_keep_in_fp32_modules_strict`` for any half dtype and
    ``_keep_in_fp32_modules`` for float16 only (T5's ``wo``)."""
    if dtype == torch.float32:
        return False
    keep = list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if not hasattr(model, "config_class") or dtype == torch.float16:
        keep += getattr(model, "_keep_in_fp32_modules", None) or []
    parts = name.split(".")
    return any(k in parts or name.startswith(k + ".") for k in keep)


def param_dtype(model: torch.nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter ``name`` of ``model`` loads in when the checkpoint loads in ``dtype``."""
    return torch.float32 if keeps_fp32(model, name, dtype) else dtype
