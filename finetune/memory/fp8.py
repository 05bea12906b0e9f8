"""fp8 frozen weights: e4m3 storage with one scale per output row, quantised while loading.

The representation is our own small tensor type, :class:`Fp8Weight`: an ``nn.Linear`` keeps its
class and its ``weight`` parameter becomes an Fp8Weight holding ``qdata`` (``float8_e4m3fn``
[out, in]) and ``scale`` (float32 [out, 1]), reporting the shape [out, in] and the dtype it
computes in (``model.dtype``). Written by hand rather than kept on torchao's ``Float8Tensor``
because four things we need are not what that type does:
  - backward: torchao's linear is ``F.linear(x, W.dequantize())`` under autograd, so every layer
    keeps its dequantised bf16 weight for backward and makes a float32 [out, in] transient to
    get it. :func:`fp8_linear` is an autograd function that saves only the fp8 parameter itself
    (qdata and scale) and dequantises again in backward, straight into the compute dtype.
  - exact, transient-free dequantisation: scales are rounded to bf16-representable values, so
    ``qdata.to(bf16) * scale.to(bf16)`` (one bf16 [out, in] tensor, multiplied in place) is
    bit-identical to dequantising in float32 and rounding once.
  - merging: peft wraps a torchao weight as ``TorchaoLoraLinear``, which warns on every run that
    merge()/unmerge() will raise (it can only requantise int8 weights loaded through
    transformers). An Fp8Weight is not a torchao type, so peft wraps its layer as a plain
    ``lora.Linear``; ``weight.data += delta`` (peft's merge) dequantises, adds and requantises
    in place, so fuse/unfuse work within fp8 rounding.
  - tracing: it is a traceable wrapper subclass with no storage of its own, so a model built on
    the meta device quantises (:func:`quantize_fp8`) and runs forward and backward on fake tensors
    (``FakeTensorMode``, ``to_empty`` or ``mode.from_tensor``) for the memory planner.
Any other op on an Fp8Weight (``torch.equal``, ``isfinite``, a slice) runs on its dequantised
value; in-place ops other than copy_/add_/sub_ raise. torchao stays for int8 text encoders
(``memory.text_encoder: int8``), which never train.

Which layers: the ``nn.Linear`` layers inside the model's repeated blocks (every ``nn.ModuleList``:
``blocks``, ``transformer_blocks``, ``encoder.block``, ``layers``), where nearly all weight bytes
are. Kept in the compute dtype: patch/text/time embedders, norms and the modulation (AdaLN) linears
inside blocks (small, and an error in a shift/scale is multiplied into every token), blocks that
belong to an embedder (HunyuanVideo's token refiner), and the output projection (outside the
blocks; the last layer writes the prediction itself). In the real checkpoints the converted
layers hold nearly all the weights (Wan 2.1 14B: 98.3%, so 26.6 GiB of bf16 become 13.5 GiB).

Loading (:func:`load_fp8_pretrained`) builds the model on the meta device and reads the
safetensors tensor by tensor, quantising each block weight as it arrives: host memory peaks at
the fp8 model plus one full-precision tensor (and its float32 copy while quantising), never the
whole bf16 state dict.

Not measured here (no GPU on this machine): the speed of the dequantise-then-matmul kernels on a
GPU. A scaled-mm path (fp8 activations too, sm89+) could replace :func:`fp8_linear`'s matmuls
later without changing the storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils._pytree import tree_map_only

from finetune.errors import UserError

# Linear layers whose qualified name contains one of these stay in the compute dtype (module docstring).
# (The model's output projection is outside the blocks, so the block rule already keeps it; a
# block's own proj_out, as in HunyuanVideo's single-stream blocks, is a big linear and is converted.)
KEEP_WORDS = ("norm", "modulation", "adaln", "emb")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
aten = torch.ops.aten


class Fp8Unsupported(UserError, ValueError):
    """fp8 was asked for on a model (or a checkpoint) whose layers cannot take it."""


# ---------------------------------------------------------------------------- the representation


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] (any float dtype) -> (``qdata`` e4m3 [out, in], ``scale`` float32 [out, 1])
    with ``w ~= qdata * scale``: each row scaled so its largest magnitude maps to 448. The scale
    is rounded to a bf16-representable value, which makes bf16 dequantisation exact (module
    docstring); the row maximum may then land up to 2^-9 above 448 and is clamped."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16).float()
    qdata = (w32 / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # not in place: w32 may be ``w`` itself
    return qdata, scale


class Fp8Weight(torch.Tensor):
    """A frozen linear weight [out, in] stored as ``qdata`` (e4m3 [out, in]) times ``scale``
    (float32 [out, 1]), reporting ``dtype``, the dtype it computes in (module docstring).
    ``F.linear`` with it runs :func:`fp8_linear`."""

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, shape: torch.Size | None = None):
        # ``shape`` is the weight's, kept when block swap leaves a 0-element placeholder in qdata
        return torch.Tensor._make_wrapper_subclass(cls, shape if shape is not None else qdata.shape, dtype=dtype,
                                                   device=qdata.device, requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 shape: torch.Size | None = None):
        self.qdata = qdata
        self.scale = scale

    @classmethod
    def from_float(cls, w: torch.Tensor, dtype: torch.dtype | None = None) -> "Fp8Weight":
        """Quantise ``w`` [out, in]; it computes in ``dtype`` (default: ``w``'s dtype)."""
        if w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"fp8 weights are 2-d floating point [out, in]; got {w.dtype} {tuple(w.shape)}")
        return cls(*quantize_rows(w), dtype or w.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A plain [out, in] tensor in ``dtype`` (default: the compute dtype). bf16 and float32
        are made without a float32 transient and bit-identical to each other's rounding; other
        dtypes go through float32."""
        dtype = dtype or self.dtype
        if dtype in (torch.bfloat16, torch.float32):
            return self.qdata.to(dtype).mul_(self.scale.to(dtype))
        return (self.qdata.float() * self.scale).to(dtype)

    # --- tracing and copying (traceable wrapper subclass protocol) ---
    def __tensor_flatten__(self):
        return ["qdata", "scale"], (self.dtype,)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx: tuple, outer_size, outer_stride) -> "Fp8Weight":
        return Fp8Weight(inner["qdata"], inner["scale"], ctx[0], torch.Size(outer_size))

    def _like(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> "Fp8Weight":
        return Fp8Weight(qdata, scale, dtype or self.dtype, self.shape)

    def __repr__(self) -> str:
        return (f"Fp8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"e4m3 with per-row float32 scales)")

    # ``param.data = other`` (peft's safe merge, a dtype change) must replace the inner tensors: the
    # C-level setter would only swap the wrapper's (empty) metadata.
    @property
    def data(self) -> "Fp8Weight":
        return self.detach()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if not isinstance(value, Fp8Weight) or value.shape != self.shape:
            raise TypeError(f"cannot set the data of an fp8 weight {tuple(self.shape)} to a "
                            f"{type(value).__name__} {tuple(value.shape)}; assign an Fp8Weight of the same shape")
        if value.dtype == self.dtype and value.device == self.device:
            self.qdata, self.scale = value.qdata, value.scale
            return
        state = {k: v for k, v in self.__dict__.items() if k not in ("qdata", "scale")}  # _is_param
        torch.utils.swap_tensors(self, value.detach())
        self.__dict__.update(state)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, Fp8Weight) and not isinstance(x, Fp8Weight):
                return fp8_linear(x, w, b)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _OPS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func._schema.is_mutable and args and isinstance(args[0], Fp8Weight):
            raise NotImplementedError(f"{func} would modify an fp8 weight in place; only copy_, add_ and sub_ "
                                      f"can (dequantise it with .dequantize() to work on its values)")
        args, kwargs = tree_map_only(Fp8Weight, lambda w: w.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def _detach(w: Fp8Weight) -> Fp8Weight:
    # shares the inner tensors, so an in-place op on ``param.data`` (peft's merge) changes the parameter
    return w._like(w.qdata, w.scale)


def _to_copy(w: Fp8Weight, *, dtype=None, device=None, non_blocking=False, **_) -> Fp8Weight:
    # A dtype change changes the compute dtype (``model.to(torch.bfloat16)``); the storage stays fp8.
    return w._like(w.qdata.to(device=device, non_blocking=non_blocking), w.scale.to(device=device,
                   non_blocking=non_blocking), dtype)


def _clone(w: Fp8Weight, **_) -> Fp8Weight:
    return w._like(w.qdata.clone(), w.scale.clone())


def _empty_like(w: Fp8Weight, *, dtype=None, device=None, **_) -> Fp8Weight:
    return w._like(torch.empty_like(w.qdata, device=device), torch.empty_like(w.scale, device=device), dtype)


def _copy_(dst: Fp8Weight, src: torch.Tensor, non_blocking: bool = False) -> Fp8Weight:
    if not isinstance(dst, Fp8Weight):  # a plain tensor from an fp8 one: its value
        return dst.copy_(src.dequantize(dst.dtype), non_blocking)
    if not isinstance(src, Fp8Weight):
        src = Fp8Weight.from_float(src.to(dst.device))
    dst.qdata.copy_(src.qdata, non_blocking)
    dst.scale.copy_(src.scale, non_blocking)
    return dst


def _add_(w: Fp8Weight, other: torch.Tensor, alpha: float = 1, sign: int = 1) -> Fp8Weight:
    """Dequantise, add and requantise in place (new per-row scales): peft's merge and unmerge."""
    if isinstance(other, Fp8Weight):
        other = other.dequantize(torch.float32)
    merged = w.dequantize(torch.float32).add_(other.to(w.device, torch.float32), alpha=sign * alpha)
    qdata, scale = quantize_rows(merged)
    w.qdata.copy_(qdata)
    w.scale.copy_(scale)
    return w


_OPS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.empty_like.default: _empty_like,
    aten.copy_.default: _copy_,
    aten.add_.Tensor: _add_,
    aten.sub_.Tensor: lambda w, other, alpha=1: _add_(w, other, alpha, sign=-1),
}


def _compute_dtype(x: torch.Tensor, w: Fp8Weight) -> torch.dtype:
    """The dtype the matmul runs in: autocast's when it is on for ``x``'s device, else the weight's."""
    device = x.device.type
    try:
        on = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device autocast does not know (the planner's meta tensors)
        on = False
    return torch.get_autocast_dtype(device) if on else w.dtype


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W an Fp8Weight: saves only W (the parameter: its fp8 data and scales)
    and dequantises it again in backward. W is frozen: no gradient for it (the bias may train)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None):
        dtype = _compute_dtype(x, weight)
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x, weight.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.dtype).matmul(weight.dequantize(ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_b


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., in], weight Fp8Weight [out, in] -> [..., out], in
    autocast's dtype when autocast is on (as ``F.linear`` would), else the weight's compute dtype.
    Raises RuntimeError if ``weight`` requires grad (fp8 weights are frozen)."""
    if weight.requires_grad:
        raise RuntimeError("fp8 weights are frozen and cannot require grad (train a LoRA on the layer instead)")
    return _Fp8Linear.apply(x, weight, bias)


# ---------------------------------------------------------------------------- converting models


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


def _torchao_int8(linear: torch.nn.Linear) -> None:
    # Imported on first use: torchao takes seconds to import and only int8 text encoders need it
    # (its CUDA-library warnings are held back in finetune/memory/__init__.py).
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(linear, Int8WeightOnlyConfig())


def quantize_linear(linear: torch.nn.Linear, mode: str = "fp8") -> None:
    """Replace ``linear.weight`` [out, in] in place by an :class:`Fp8Weight` computing in the
    dtype the weight had (``mode="fp8"``), or by torchao int8 with per-row scales (``"int8"``,
    text encoders only); frozen. Works on meta and fake weights too (the planner traces those)."""
    if mode == "fp8":
        linear.weight = torch.nn.Parameter(Fp8Weight.from_float(linear.weight), requires_grad=False)
    else:
        _torchao_int8(linear)
    linear.weight.requires_grad_(False)


def quantize_fp8(model: torch.nn.Module, mode: str = "fp8", what: str = "model") -> list[str]:
    """Quantise the block linears of an already-built ``model`` in place (tiny models, text
    encoders, and models built on the meta device or with fake weights for tracing); returns
    their names. Raises Fp8Unsupported if the model has none."""
    names = fp8_layer_names(model)
    if not names:
        raise Fp8Unsupported(f"{what} ({type(model).__name__}) has no nn.Linear layers in repeated blocks, "
                             f"so {mode} quantisation would change nothing; set it back to none/gpu")
    for name in names:
        quantize_linear(model.get_submodule(name), mode)
    return names


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a quantised weight (an Fp8Weight, a torchao int8 weight) rather than
    a plain tensor."""
    return type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter and hasattr(tensor, "dequantize")


def inner_tensors(tensor: torch.Tensor) -> list[str] | None:
    """Names of the tensors a quantised weight is made of (Fp8Weight: ``qdata``, ``scale``), None
    for a plain tensor, [] for a kind that does not say (bitsandbytes)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return None
    flatten = getattr(tensor, "__tensor_flatten__", None)
    return list(flatten()[0]) if flatten is not None else []


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
