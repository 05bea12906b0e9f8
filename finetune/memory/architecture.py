"""Parameter counts from a model's real architecture: the family's full-size config built into its
real class on the meta device (no weights, no host memory), then counted per dtype, per
quantisation and per LoRA target.

Bytes per frozen parameter under each ``model.quantization`` (only nn.Linear weights of the
transformer are quantised, as bitsandbytes and our fp8 do; biases, norms, embeddings and the
modules a model keeps in float32 stay as they are):
  none  the load dtype (bf16: 2 B)
  int8  1 B + one float32 scale per output row (LLM.int8 ``SCB``)
  nf4   0.5 B + one float32 absmax per block of 64 (diffusers' BitsAndBytesConfig default: no
        double quantisation)
  fp8   1 B (e4m3) + one float32 scale per output row
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch

from finetune.families.base import FullSize
from finetune.weights.dtypes import keeps_fp32, param_dtype

NF4_BLOCK = 64
# model.quantization -> (bytes per weight element, bytes of scale per output row, per element)
QUANT_BYTES: dict[str, tuple[float, float, float]] = {
    "int8": (1.0, 4.0, 0.0),
    "nf4": (0.5, 0.0, 4.0 / NF4_BLOCK),
    "fp8": (1.0, 4.0, 0.0),
}


def _freeze(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _build(cls: type, frozen: str) -> torch.nn.Module:
    config = json.loads(frozen)
    with torch.device("meta"):
        if hasattr(cls, "config_class") and hasattr(cls, "_from_config"):  # transformers
            return cls._from_config(cls.config_class(**config))
        return cls.from_config(config)


def build_meta(full: FullSize, **changes) -> torch.nn.Module:
    """``full.cls`` built from ``full.config`` (with ``changes``) on the meta device; cached, so
    treat the result as read-only."""
    return _build(full.cls, _freeze({**full.config, **changes}))


def quantized_linears(model: torch.nn.Module, quantization: str, blocks_only: bool) -> set[str]:
    """Names of the nn.Linear layers that ``quantization`` stores in fewer bytes: the block linears
    ``finetune.weights.fp8`` converts (fp8, and torchao int8 for text encoders: ``blocks_only``),
    or every linear (bitsandbytes int8/nf4 on the transformer)."""
    if quantization == "none":
        return set()
    if blocks_only or quantization == "fp8":
        from finetune.weights.fp8 import fp8_layer_names

        return set(fp8_layer_names(model))
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype, quantization: str = "none",
                 prefix: str = "", blocks_only: bool = False) -> int:
    """Bytes of the frozen parameters of ``model`` (those under ``prefix``) loaded in ``dtype`` and
    quantised as ``quantization`` (module docstring; which layers: :func:`quantized_linears`, fp8
    keeping embedders, norms, modulation and the output layer in ``dtype``). Floating buffers count
    in the load dtype too (loading casts them); integer buffers as they are."""
    total = 0.0
    quantised: set[str] = set()
    if quantization != "none":
        per_el, per_row, per_el_scale = QUANT_BYTES[quantization]
        layers = quantized_linears(model, quantization, blocks_only)
        for name, m in model.named_modules():
            if name in layers and name.startswith(prefix) and not keeps_fp32(model, name, dtype):
                out_f, in_f = m.weight.shape
                total += out_f * in_f * (per_el + per_el_scale) + out_f * per_row
                quantised.add(f"{name}.weight")
    for name, p in model.named_parameters():
        if name.startswith(prefix) and name not in quantised:
            total += p.numel() * torch.empty((), dtype=param_dtype(model, name, dtype)).element_size()
    for name, b in model.named_buffers():
        if name.startswith(prefix):  # floating buffers are cast with the model, as loading does
            buf_dtype = param_dtype(model, name, dtype) if b.is_floating_point() else b.dtype
            total += b.numel() * torch.empty((), dtype=buf_dtype).element_size()
    return int(total)


def matches_target(name: str, targets: list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module name equals one or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_param_count(model: torch.nn.Module, targets: list[str] | tuple[str, ...], rank: int,
                     prefix: str = "") -> int:
    """LoRA parameters PEFT adds: r x (in + out) per targeted nn.Linear (under ``prefix``)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith(prefix) and matches_target(name, targets))


@dataclass(frozen=True)
class Blocks:
    """The repeated blocks of a transformer: per ModuleList name, how many and the bytes of one
    (frozen, as loaded)."""

    counts: dict[str, int]
    bytes_each: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def largest(self) -> int:
        return max(self.bytes_each.values(), default=0)

    def swapped(self, n: int) -> tuple[int, int]:
        """(bytes, bytes of the largest block) of the last ``n`` blocks in execution order (the
        lists in registration order), the ones ``memory.blocks_to_swap`` streams
        (finetune/memory/blockswap.py)."""
        total, largest = 0, 0
        for name in reversed(list(self.counts)):
            take = min(n, self.counts[name])
            if take:
                total += take * self.bytes_each[name]
                largest = max(largest, self.bytes_each[name])
            n -= take
        return total, largest


def block_lists(model: torch.nn.Module) -> dict[str, int]:
    """Top-level nn.ModuleLists of ``model`` with their lengths (the repeated blocks)."""
    return {n: len(m) for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)}


def blocks_of(full: FullSize, dtype: torch.dtype, quantization: str) -> Blocks:
    """The block lists that the config's block-count keys set (those that shrink to one block
    when the keys are 1), with the frozen bytes of one block of each."""
    model = build_meta(full)
    ones = {k: 1 for k in full.block_counts()}
    small = block_lists(build_meta(full, **ones)) if ones else {}
    counts = {n: c for n, c in block_lists(model).items() if small.get(n) == 1 and c > 1}
    each = {n: weight_bytes(model, dtype, quantization, prefix=f"{n}.0.") for n in counts}
    return Blocks(counts, each)
