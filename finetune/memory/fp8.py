"""fp8 frozen weights: e4m3 storage with one scale per output row, quantised while loading.

The storage and the linear are torchao's (``Float8WeightOnlyConfig`` with ``PerRow`` scales): it
runs on a CPU, peft wraps the quantised ``nn.Linear`` as a LoRA base layer like any other, and
gradient checkpointing recomputes through it, so nothing here reimplements a quantised linear.
Its forward dequantises the weight to the dtype it had before quantisation (``model.dtype``) and
calls ``F.linear``; LoRA A/B stay fp32 masters on top. A GPU scaled-mm path (fp8 activations too,
torchao's ``Float8DynamicActivationFloat8WeightConfig``) could be added later; it needs an sm89+
GPU and has not been measured here (no GPU on this machine).

Which layers: the ``nn.Linear`` layers inside the model's repeated blocks (every ``nn.ModuleList``:
``blocks``, ``transformer_blocks``, ``encoder.block``, ``layers``), where nearly all weight bytes
are. Kept in the compute dtype: patch/text/time embedders, norms and the modulation (AdaLN) linears
inside blocks (small, and an error in a shift/scale is multiplied into every token), blocks that
belong to an embedder (HunyuanVideo's token refiner), and the output projection (outside the
blocks; the last layer writes the prediction itself). In the real checkpoints the converted
layers hold nearly all the weights (Wan 2.1 14B: 98.3%, so 26.6 GiB of bf16 become 13.5 GiB).

Loading (:func:`load_fp8_pretrained`) builds the model on the meta device and reads the
safetensors tensor by tensor, quantising each block weight as it arrives: host memory peaks at
the fp8 model plus one full-precision tensor, never the whole bf16 state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from finetune.errors import UserError

# Linear layers whose qualified name contains one of these stay in the compute dtype (module docstring).
# (The model's output projection is outside the blocks, so the block rule already keeps it; a
# block's own proj_out, as in HunyuanVideo's single-stream blocks, is a big linear and is converted.)
KEEP_WORDS = ("norm", "modulation", "adaln", "emb")


class Fp8Unsupported(UserError, ValueError):
    """fp8 was asked for on a model (or a checkpoint) whose layers cannot take it."""


def fp8_layer_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers :func:`quantize_fp8` converts: those inside an
    ``nn.ModuleList`` (the repeated blocks) whose name has none of :data:`KEEP_WORDS`."""
    in_blocks: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            in_blocks.update(f"{name}.{sub}" if name else sub for sub, _ in module.named_modules() if sub)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name in in_blocks
            and not any(w in name.lower() for w in KEEP_WORDS)]


def _torchao():
    # Imported on first use: torchao takes seconds to import and only fp8/int8 runs need it (its
    # CUDA-library warnings are held back in finetune/memory/__init__.py).
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, PerRow, quantize_

    return quantize_, Float8WeightOnlyConfig, Int8WeightOnlyConfig, PerRow


def quantize_linear(linear: torch.nn.Linear, mode: str = "fp8") -> None:
    """Replace ``linear.weight`` [out, in] in place by e4m3 values with one fp32 scale per output
    row (``mode="fp8"``) or int8 with per-row scales (``"int8"``); frozen, computing in the
    dtype the weight had."""
    quantize_, fp8_config, int8_config, per_row = _torchao()
    config = fp8_config(granularity=per_row()) if mode == "fp8" else int8_config()
    quantize_(linear, config)
    linear.weight.requires_grad_(False)


def quantize_fp8(model: torch.nn.Module, mode: str = "fp8", what: str = "model") -> list[str]:
    """Quantise the block linears of an already-built ``model`` in place (tiny models, text
    encoders); returns their names. Raises Fp8Unsupported if the model has none."""
    names = fp8_layer_names(model)
    if not names:
        raise Fp8Unsupported(f"{what} ({type(model).__name__}) has no nn.Linear layers in repeated blocks, "
                             f"so {mode} quantisation would change nothing; set it back to none/gpu")
    for name in names:
        quantize_linear(model.get_submodule(name), mode)
    return names


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a quantised (torchao) weight rather than a plain tensor."""
    return type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter and hasattr(tensor, "dequantize")


# ---------------------------------------------------------------------------- loading


def local_folder(pretrained: str, subfolder: str | None, revision: str | None) -> Path:
    """The folder holding ``subfolder`` of ``pretrained`` (a local folder or a hub id, fetched or
    found in the hub cache with only that subfolder's files)."""
    root = Path(pretrained)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(pretrained, revision=revision,
                                      allow_patterns=[f"{subfolder}/*"] if subfolder else None))
    return root / subfolder if subfolder else root


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a diffusers model folder, in index order. Raises
    Fp8Unsupported when there are none (a ``.bin`` checkpoint cannot be read tensor by tensor)."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        shards = json.loads(index[0].read_text())["weight_map"].values()
        return [folder / s for s in dict.fromkeys(shards)]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Fp8Unsupported(f"{folder}: no .safetensors weights; fp8 loading reads safetensors tensor by tensor "
                             f"(convert the checkpoint, or set model.quantization=none)")
    return files


def load_fp8_pretrained(cls: Any, pretrained: str, subfolder: str | None, dtype: torch.dtype,
                        revision: str | None = None) -> torch.nn.Module:
    """``cls`` (a diffusers ModelMixin class) from ``pretrained``/``subfolder`` with its block
    linears in fp8 and everything else in ``dtype`` (modules ``cls`` keeps in fp32 stay fp32).
    Raises Fp8Unsupported (no block linears, no safetensors) and ValueError naming missing or
    unexpected checkpoint keys."""
    from accelerate import init_empty_weights

    folder = local_folder(pretrained, subfolder, revision)
    # Parameters on the meta device; buffers (rope tables, not in the checkpoint) built for real.
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(str(folder)))
    targets = set(fp8_layer_names(model))
    if not targets:
        raise Fp8Unsupported(f"{cls.__name__} has no nn.Linear layers in repeated blocks to store in fp8 "
                             f"(set model.quantization=none)")

    def tensors():
        for file in weight_files(folder):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    fill(model, tensors(), dtype, targets, what=str(folder))
    model.register_to_config(_name_or_path=pretrained)
    return model.eval().requires_grad_(False)


def fill(model: torch.nn.Module, tensors, dtype: torch.dtype, targets: set[str], what: str,
         keep_fp32: Callable[[str], bool] | None = None) -> None:
    """Load ``tensors`` (an iterable of (key, tensor), one at a time: a checkpoint's, or random ones)
    into ``model``, built with its parameters on the meta device: each cast to ``dtype``, or to
    float32 where ``keep_fp32(key)`` (default: diffusers' rule, a key through one of the model's
    ``_keep_in_fp32_modules``), the weights of the ``targets`` linears quantised to fp8 as they
    arrive. Raises ValueError naming missing or unexpected keys (``what``: the source)."""
    if keep_fp32 is None:
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())

        def keep_fp32(key: str) -> bool:
            return any(m in key.split(".") for m in keep)

    unexpected = [key for key, tensor in tensors if not _place(model, key, tensor, targets, keep_fp32, dtype)]
    missing = [n for n, p in (*model.named_parameters(), *model.named_buffers()) if p.is_meta]
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not fit {type(model).__name__}: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")


def _place(model: torch.nn.Module, key: str, tensor: torch.Tensor, targets: set[str],
           keep_fp32: Callable[[str], bool], dtype: torch.dtype) -> bool:
    """Put checkpoint tensor ``key`` into ``model``, quantising it if it is a target linear's
    weight; False if the model has no such tensor."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32 if keep_fp32(key) else dtype)
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
        if attr == "weight" and module_name in targets:
            quantize_linear(module)  # the full-precision tensor is dropped here
        return True
    if attr in module._buffers:
        module._buffers[attr] = tensor
        return True
    return False
