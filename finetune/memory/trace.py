"""The live accelerator memory of one training step, traced on the real transformer at full width
without memory or weights.

What is traced: the family's full-size transformer config with each repeated block list cut to a
few blocks (``FullSize.block_keys`` set to 1, then to 2 for each list in turn), built on the meta
device and given fake parameters in the load dtype under ``FakeTensorMode``, quantised as the
recipe says (``finetune.weights.fp8`` on the fake weights), with the trainer's own LoRA
(``trainer.add_lora``: fp32 masters, the recipe's targets and rank) and gradient checkpointing as
the recipe sets it. The family's :meth:`Family.predict` then runs it on fake inputs of the
recipe's shape (:meth:`Family.planning_inputs`), the trainer's fp32 MSE follows, and backward runs
through it (recomputing each checkpointed block). Nothing here is a formula of what a block keeps.

What is counted (:class:`LiveBytes`, a dispatch mode that sees every op of forward, recomputation
and backward): the bytes of every storage alive at each moment, freed when its last reference
goes, each rounded as the CUDA caching allocator rounds a request (512 B, 2 MiB above 1 MiB); the
peak of their sum is the step's activation memory. Parameters (frozen and LoRA) and the LoRA
gradients are left out: the planner counts those exactly from the architecture.

What a GPU does that a CPU trace would not, emulated:
  - CUDA autocast's dtype rules (:class:`CudaAutocast`): matmuls, linears and attention in bf16,
    norms, ``exp``/``pow``/losses in float32 (so a norm's float32 input copy is saved, as on the
    card), ``softmax``/``sum`` with a float32 output, mixed ``cat`` promoted; leaf tensors that
    require grad (the fp32 LoRA weights) cast once per autocast region, as autocast's cache does.
    The table is torch's CUDA list (aten/src/ATen/autocast_mode.cpp), checked against CUDA
    autocast itself by tests/test_planner.py on fake CUDA tensors.
  - Attention as the CUDA kernels keep it: without a mask, flash attention (output and a float32
    logsumexp per head and query, never an [L, L] matrix); with a mask, the mask made into a bias
    in the query dtype at its given shape and kept for backward (the memory-efficient kernel), so
    a dense [1, 1, S, S] mask costs its 2 S^2 bytes; in backward, a float32 query-sized gradient
    accumulator, as flash attention's backward allocates.
  - Activation offload (``memory.activation_offload``): what the transformer saves for backward
    leaves the device (counted as pinned host bytes) and comes back one block at a time, with one
    more block's worth in flight (the prefetch).

Models that gather valid prompt tokens by their mask (HunyuanVideo-1.5, Mochi) trace with every
token valid (:class:`_ValueFree`): an overestimate of at most the prompt length.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten, tree_map

from finetune._quiet import held_back
from finetune.families.base import Components, Family, FullSize, ModelSpec, Stream
from finetune.memory.architecture import block_lists, build_meta
from finetune.memory.lora import set_emulated_autocast
from finetune.weights.dtypes import keeps_fp32

# ---------------------------------------------------------------------------- CUDA autocast

# torch's CUDA autocast lists (aten/src/ATen/autocast_mode.cpp, torch 2.x), by the name the op has
# in Python (F.linear, Tensor.softmax, torch.rms_norm, Tensor.__matmul__ -> "matmul").
AUTOCAST_LOWER = frozenset({
    "linear", "matmul", "mm", "bmm", "baddbmm", "addbmm", "addmm", "addmv", "addr", "mv", "einsum", "chain_matmul",
    "linalg_multi_dot", "linalg_vecdot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "convolution", "conv_tbc", "prelu", "scaled_dot_product_attention",
})
AUTOCAST_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "softplus", "layer_norm", "group_norm", "rms_norm", "frobenius_norm", "nuclear_norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "interpolate", "square",
})
# run with a float32 result when an input is half precision ("fp32_set_opt_dtype")
AUTOCAST_FP32_OUT = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "sum", "prod", "norm",
                               "linalg_vector_norm", "linalg_matrix_norm"})
# every floating input cast to the widest floating dtype among them
AUTOCAST_PROMOTE = frozenset({"cat", "stack", "addcdiv", "addcmul", "atan2", "cross", "dot", "tensordot",
                              "bilinear", "index_put", "index_copy", "scatter_add", "grid_sampler"})
_ALIASES = {"rmatmul": "matmul", "rpow": "pow", "vector_norm": "linalg_vector_norm",
            "matrix_norm": "linalg_matrix_norm", "vecdot": "linalg_vecdot", "multi_dot": "linalg_multi_dot"}


def autocast_policy(name: str) -> str | None:
    """"lower", "fp32", "fp32_out", "promote" or None (runs in its inputs' dtype) for an op name."""
    name = _ALIASES.get(name, name)
    for policy, names in (("lower", AUTOCAST_LOWER), ("fp32", AUTOCAST_FP32), ("fp32_out", AUTOCAST_FP32_OUT),
                          ("promote", AUTOCAST_PROMOTE)):
        if name in names:
            return policy
    return None


def _op_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name.endswith("_") and not name.startswith("__"):  # in-place ops are not autocast
        return ""
    return name.strip("_")


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast to ``dtype`` emulated on any device (module docstring). Use it where CUDA
    autocast would be on; under gradient checkpointing, the recomputed function must enter it again
    (:func:`checkpoint_under`), as ``torch.utils.checkpoint`` re-enters autocast."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._depth = 0

    def __enter__(self):
        # nested regions (a checkpointed block inside the autocast forward) are one region, as in
        # autocast; the mode is on the stack once
        self._depth += 1
        if self._depth > 1:
            return self
        set_emulated_autocast(True)  # the LoRA layers compute as under real autocast
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return None
        self._cache.clear()  # autocast's cast cache lives as long as the outermost region
        set_emulated_autocast(False)
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        policy = autocast_policy(name) if name else None
        if policy is None:
            return func(*args, **kwargs)
        if name == "scaled_dot_product_attention":
            return self._attention(func, args, kwargs)
        if policy == "lower":
            args, kwargs = self._cast((args, kwargs), self.dtype)
        elif policy == "fp32":
            args, kwargs = self._cast((args, kwargs), torch.float32)
        elif policy == "fp32_out":
            first = next((a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), None)
            if first is not None and first.dtype in (torch.bfloat16, torch.float16) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif policy == "promote":
            floats = [a.dtype for a in tree_flatten((args, kwargs))[0]
                      if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if floats:
                widest = max(floats, key=lambda d: torch.finfo(d).bits)
                args, kwargs = self._cast((args, kwargs), widest)
        return func(*args, **kwargs)

    def cached_bytes(self) -> int:
        """Device bytes of the casts held in the cast cache (freed when the region ends)."""
        return sum(allocator_bytes(c.untyped_storage().nbytes()) for _, c in self._cache.values())

    def _cast(self, tree, dtype: torch.dtype):
        def cast(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
                return t
            if t.is_leaf and t.requires_grad:  # autocast caches casts of weights that train
                hit = self._cache.get(id(t))
                if hit is None or hit[0] is not t:
                    hit = self._cache[id(t)] = (t, t.to(dtype))
                return hit[1]
            return t.to(dtype)

        return tree_map(cast, tree)

    def _attention(self, func, args, kwargs):
        bound = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
        q, k, v = self._cast([bound.pop("query"), bound.pop("key"), bound.pop("value")], self.dtype)
        mask = bound.get("attn_mask")
        if mask is not None:
            # the memory-efficient kernel takes the mask as a bias in the query dtype, kept for backward
            bound["attn_mask"] = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                mask.logical_not(), -math.inf) if mask.dtype == torch.bool else mask.to(q.dtype)
        out = _flash(q, k, v, **bound)
        if out.requires_grad and out.grad_fn is not None:
            shape, held = tuple(q.shape), []
            # flash attention's backward accumulates dq in float32
            out.grad_fn.register_prehook(lambda grads: held.append(torch.empty(shape, dtype=torch.float32)))
            out.grad_fn.register_hook(lambda grad_in, grad_out: held.clear())
        return out


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Attention through the fused CPU kernel, which keeps what CUDA flash attention keeps (the
    output and a float32 logsumexp per head and query): ``F.scaled_dot_product_attention`` itself
    would pick the math kernel on meta tensors and keep [heads, L, L] scores."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:  # the kernel wants as many key heads as query heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


def checkpoint_under(autocast: CudaAutocast):
    """A ``gradient_checkpointing_func`` for diffusers models whose recomputation runs under
    ``autocast`` again (``torch.utils.checkpoint`` restores real autocast itself, not a mode)."""
    from torch.utils.checkpoint import checkpoint

    def run(module, *args):
        def call(*a):
            with autocast:
                return module(*a)
        return checkpoint(call, *args, use_reentrant=False)

    return run


# ---------------------------------------------------------------------------- live bytes


def allocator_bytes(n: int) -> int:
    """What the CUDA caching allocator hands out for a request of ``n`` bytes: 512-byte blocks,
    2 MiB pages above 1 MiB."""
    page = 512 if n <= 1 << 20 else 2 << 20
    return -(-n // page) * page


class LiveBytes(TorchDispatchMode):
    """Every storage an op creates, counted (rounded by :func:`allocator_bytes`) while it lives;
    ``peak`` is the largest sum seen. Storages of ``exclude`` (parameters) and those handed to
    :meth:`forget` (gradients, host copies) are not counted. Works on fake and real tensors."""

    def __init__(self, exclude: list[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._skip = {t.untyped_storage()._cdata for t in _plain_parts(exclude)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out

    def add(self, t: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(t):  # a quantised weight: its inner tensors came through here
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes or key in self._skip or storage.nbytes() == 0:
            return
        n = allocator_bytes(storage.nbytes())
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def forget(self, t: torch.Tensor) -> None:
        """Stop counting ``t``'s storage (a gradient the planner counts itself)."""
        key = t.untyped_storage()._cdata
        self.live -= self._sizes.pop(key, 0)
        self._skip.add(key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._skip.discard(key)


class FlopCount(TorchDispatchMode):
    """FLOPs of every matmul, convolution and attention op that runs, from torch's own formulas
    (``torch.utils.flop_counter``'s registry) in a bare dispatch mode: unlike ``FlopCounterMode``
    it hooks no modules, so it keeps no tensor alive."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def _plain_parts(tensors) -> list[torch.Tensor]:
    """``tensors`` with each wrapper subclass (a torchao quantised weight) replaced by its inner tensors."""
    out = []
    for t in tensors:
        if is_traceable_wrapper_subclass(t):
            out += _plain_parts([getattr(t, n) for n in t.__tensor_flatten__()[0]])
        else:
            out.append(t)
    return out


class _OffloadEmulation:
    """``memory.activation_offload`` for the trace: what autograd saves inside the transformer's
    forward goes to host memory (its device bytes freed, its size added to ``host``) and comes
    back as a new device tensor when backward needs it, with a second of the same size held as
    the next block's prefetch until the following restore."""

    def __init__(self):
        self.host = 0
        self.host_peak = 0
        self._prefetch: torch.Tensor | None = None

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or is_traceable_wrapper_subclass(t) or t.numel() == 0:
            return t
        n = t.untyped_storage().nbytes()
        self.host += n
        self.host_peak = max(self.host_peak, self.host)
        return (t.shape, t.stride(), t.dtype, n)

    def unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        shape, stride, dtype, n = packed
        self.host -= n
        self._prefetch = None
        out = torch.empty_strided(shape, stride, dtype=dtype)
        self._prefetch = torch.empty_strided(shape, stride, dtype=dtype)
        return out


class _ValueFree(TorchDispatchMode):
    """Answers the few ops whose result depends on tensor values, which fake tensors do not
    have: a tensor read as a Python scalar (``if mask.all():``) reads as 1/True, and ``nonzero``
    (also behind boolean-mask indexing) selects every position."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.nonzero.default:
            return _every_position(args[0])
        if func is torch.ops.aten.index.Tensor and any(_is_mask(i) for i in args[1]):
            indices = []
            for i in args[1]:
                indices += list(_every_position(i).unbind(-1)) if _is_mask(i) else [i]
            return func(args[0], indices)
        return func(*args, **kwargs)


def _is_mask(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in (torch.bool, torch.uint8)


def _every_position(t: torch.Tensor) -> torch.Tensor:
    """What ``nonzero(t)`` returns when every element is nonzero: [numel, ndim] indices."""
    grids = torch.meshgrid(*[torch.arange(n, device=t.device) for n in t.shape], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


# ---------------------------------------------------------------------------- the traced step


@dataclass(frozen=True)
class StepSettings:
    """What shapes a training step's memory besides the model and clip size."""

    dtype: torch.dtype = torch.bfloat16
    quantization: str = "none"
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ()
    checkpointing: bool = True
    offload: bool = False
    audio: bool = False
    train: bool = True  # False: an inference forward (validation renders), no LoRA gradients
    batch: int = 1


@dataclass(frozen=True)
class StepTrace:
    """One traced step at ``counts`` blocks per block-count key: ``peak`` device bytes of
    activations and temporaries (module docstring), ``offloaded`` peak bytes held in host memory by
    activation offload, ``flops`` of the step as run (forward, recomputation, backward) and
    ``forward_flops`` of its forward alone, and per
    block list, what its last traced block added while forward ran: ``kept`` device bytes,
    ``kept_host`` offloaded bytes and ``block_flops`` (its forward's FLOPs)."""

    counts: tuple[tuple[str, int], ...]
    peak: int
    offloaded: int
    flops: int
    forward_flops: int
    kept: dict[str, int]
    kept_host: dict[str, int]
    block_flops: dict[str, int]


class _BlockMarks:
    """Forward hooks on every block of the model's block lists that note, when each block's first
    forward ends (not its recomputation in backward), the live device bytes (less autocast's cached
    weight casts, gone by backward), the offloaded host bytes and the FLOPs so far."""

    def __init__(self, model: torch.nn.Module, live: "LiveBytes", offload: "_OffloadEmulation", flops: "FlopCount",
                 autocast: CudaAutocast):
        self.autocast = autocast
        self.marks: dict[str, list[tuple[int, int, int]]] = {}
        self.starts: dict[str, list[int]] = {}
        self.forward = True
        self.handles = []
        for name, blocks in model.named_children():
            if isinstance(blocks, torch.nn.ModuleList):
                for block in blocks:
                    self.handles.append(block.register_forward_pre_hook(functools.partial(self._start, name, flops)))
                    self.handles.append(block.register_forward_hook(
                        functools.partial(self._end, name, live, offload, flops)))

    def _start(self, name, flops, *_):
        if self.forward:
            self.starts.setdefault(name, []).append(flops.total)

    def _end(self, name, live, offload, flops, *_):
        if self.forward:  # what stays: the live bytes less the weight casts autocast drops at its end
            self.marks.setdefault(name, []).append((live.live - self.autocast.cached_bytes(), offload.host,
                                                    flops.total))

    def added_by_last(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Per block list with two or more traced blocks: what its last block added to the live
        device bytes and the offloaded bytes (after its forward, against the block before), and
        its forward's FLOPs."""
        kept, host, fl = {}, {}, {}
        for name, marks in self.marks.items():
            if len(marks) >= 2:
                kept[name] = max(0, marks[-1][0] - marks[-2][0])
                host[name] = max(0, marks[-1][1] - marks[-2][1])
            fl[name] = marks[-1][2] - self.starts[name][-1]
        return kept, host, fl

    def remove(self):
        for h in self.handles:
            h.remove()


def _traced_model(full: FullSize, counts: dict[str, int], s: StepSettings,
                  mode: FakeTensorMode | None) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """``full`` with ``counts`` blocks, frozen parameters in the load dtype (float32 where the model
    keeps it), the block linears quantised as ``s`` says, the trainer's LoRA on it, in the order
    training does them; then, given a fake ``mode``, fake parameters throughout (else they stay on
    the meta device). Returns the model and its LoRA parameters."""
    from finetune.weights.fp8 import quantize_fp8

    model = copy.deepcopy(build_meta(full, **counts))
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(model, name, s.dtype) else s.dtype)
    model.requires_grad_(False)
    if s.quantization == "fp8":
        quantize_fp8(model, what="trace")
    with torch.device("meta"):  # peft makes its layers on the default device before moving them
        lora = _add_lora(model, s) if s.targets else []
    if mode is not None:
        with mode:
            model.to_empty(device="cpu")
    lora = [p for p in model.parameters() if p.requires_grad] if lora else []
    return model, lora


def _meta_components(fam: type[Family], parts: dict[str, FullSize], transformer: torch.nn.Module) -> Components:
    """Components whose transformer is the fake model and whose other modules are the meta-built
    full-size ones (families read their configs in ``__init__``)."""
    mods = {n: build_meta(f) for n, f in parts.items() if n not in ("transformer", "transformer_2")}
    return Components(transformer=transformer, vae=mods.get("vae"), text_encoder=mods.get("text_encoder"),
                      tokenizer=None, scheduler=None, image_encoder=mods.get("image_encoder"),
                      text_encoder_2=mods.get("text_encoder_2"))


def _add_lora(model: torch.nn.Module, s: StepSettings) -> list[torch.nn.Parameter]:
    """The trainer's LoRA (trainer.add_lora) on ``model`` with ``s``'s rank, alpha and targets."""
    from types import SimpleNamespace

    from finetune.trainer import add_lora

    lora = SimpleNamespace(init_from=None, rank=s.rank, alpha=s.alpha, dropout=0.0)
    recipe = SimpleNamespace(lora=lora, lora_targets=list(s.targets))
    return add_lora(model, recipe)


@functools.lru_cache(maxsize=256)
def trace_step(fam: type[Family], checkpoint: str, task: str, frames: int, height: int, width: int, fps: float,
               s: StepSettings, counts: tuple[tuple[str, int], ...]) -> StepTrace:
    """Trace one training step (or, with ``s.train`` False, one inference forward) of
    ``checkpoint``'s transformer at ``counts`` blocks per block-count key (module docstring). On
    meta tensors when the family's code runs on them (several times faster), else on fake ones
    (code that reads a tensor back to the host, ``.cpu()``, runs only there); both count alike."""
    args = (fam, checkpoint, task, frames, height, width, fps, s, counts)
    # torch's notes about the CPU kernels of this trace say nothing about the user's run
    with held_back(r"Mismatch dtype between input and weight", r"In CPU autocast, but the target dtype is not supported"):
        try:
            return _trace(*args, fake=False)
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            return _trace(*args, fake=True)


def _trace(fam: type[Family], checkpoint: str, task: str, frames: int, height: int, width: int, fps: float,
           s: StepSettings, counts: tuple[tuple[str, int], ...], fake: bool) -> StepTrace:
    parts = fam.full_size_configs(task)[checkpoint]
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    model, lora = _traced_model(parts["transformer"], dict(counts), s, mode)
    family = fam(_meta_components(fam, parts, model), ModelSpec(pretrained=checkpoint, dtype=s.dtype, task=task))
    latent_shape, cond_shapes = fam.planning_inputs(task, frames, height, width, fam.max_sequence_length)
    autocast = CudaAutocast(torch.bfloat16)
    offload = _OffloadEmulation()
    # fake tensors live on a fake CPU; meta ones where every tensor the code makes goes too
    where = mode if fake else torch.device("meta")
    with where:
        if s.train and s.checkpointing:
            model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_under(autocast))
        model.train(s.train)
        live = LiveBytes(exclude=[*model.parameters(), *model.buffers()])
        for p in lora:  # gradients are counted by the planner, exactly
            p.register_post_accumulate_grad_hook(lambda p: live.forget(p.grad))
    flops = FlopCount()
    grad = torch.enable_grad() if s.train else torch.no_grad()
    hooks = torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack) \
        if s.offload and s.train else contextlib.nullcontext()
    b = s.batch
    marks = _BlockMarks(model, live, offload, flops, autocast)
    try:
        with where, _ValueFree(), live, flops, grad:
            latents = torch.zeros((b, *latent_shape[1:]), dtype=s.dtype)
            cond = {k: torch.zeros((b, *shape[1:]), dtype=dt) for k, (shape, dt) in cond_shapes.items()}
            t = torch.full((b,), 500.0)
            shapes = fam.planning_streams(task, frames, height, width, fps) if s.audio else {}
            streams = {name: Stream(torch.zeros((b, *shape[1:]), dtype=s.dtype), t, torch.zeros((b, *shape[1:])))
                       for name, shape in shapes.items()}
            with autocast, hooks:
                # streams= only when there are some: the protocol's predict takes it only then
                out = family.predict(model, latents, t, cond, fps, **({"streams": streams} if streams else {}))
            forward_flops = flops.total
            if s.train:
                from finetune.trainer import masked_mse

                pred, stream_preds = out if streams else (out, {})
                loss = masked_mse(pred, torch.zeros(pred.shape, dtype=pred.dtype), None)
                for name, st in streams.items():
                    loss = loss + masked_mse(stream_preds[name], st.target, None)
                out = pred = stream_preds = None
                marks.forward = False
                loss.backward()
            out = None
    finally:
        marks.remove()
    kept, kept_host, block_flops = marks.added_by_last()
    return StepTrace(counts, live.peak, offload.host_peak, flops.total, forward_flops, kept, kept_host, block_flops)


class StepEstimate(NamedTuple):
    """One step of the whole transformer (:func:`step_peak`): device ``peak`` and ``offloaded`` host
    bytes, ``flops`` as run and ``model_flops`` (recomputation left out: the work MFU counts)."""

    peak: int
    offloaded: int
    flops: int
    model_flops: int


def step_peak(fam: type[Family], checkpoint: str, task: str, frames: int, height: int, width: int, fps: float,
              s: StepSettings, blocks: dict[str, int] | None = None) -> StepEstimate:
    """One step of the whole transformer, from one trace at 2 blocks per block list (1 where the
    model has 1): each further block of a list adds what the list's second block added while
    forward ran (the peak comes at the turn from forward to backward or in the first
    recomputations, when every block's kept inputs are alive), and its forward's FLOPs times the
    traced step's ratio of all its FLOPs to its forward's (recomputation and a backward that
    computes no gradient for frozen weights included, as they ran). ``blocks``: other block counts
    per key than the checkpoint's."""
    full = fam.full_size_configs(task)[checkpoint]["transformer"]
    keys = {**full.block_counts(), **(blocks or {})}
    traced = {k: min(2, n) for k, n in keys.items()}
    base = trace_step(fam, checkpoint, task, frames, height, width, fps, s, tuple(sorted(traced.items())))
    full_lists = block_lists(build_meta(full, **(blocks or {})))
    small_lists = block_lists(build_meta(full, **traced))
    peak, host, flops = base.peak, base.offloaded, base.flops
    passes = base.flops / base.forward_flops if base.forward_flops else 1.0
    recomputed = 0
    for name, n in full_lists.items():
        extra = n - small_lists.get(name, n)
        if extra > 0:
            peak += extra * base.kept.get(name, 0)
            host += extra * base.kept_host.get(name, 0)
            flops += int(extra * passes * base.block_flops.get(name, 0))
        recomputed += n * base.block_flops.get(name, 0)
    model_flops = flops - recomputed if (s.train and s.checkpointing) else flops
    return StepEstimate(peak, host, flops, model_flops)
