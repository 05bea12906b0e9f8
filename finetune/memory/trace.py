"""Activation bytes from tracing the real transformer at full width, without memory or weights.

How: the family's full-size transformer config with every block count set to 1 (one block of
each repeated kind, plus the embeddings and output head) is built on the meta device and given
fake parameters under ``FakeTensorMode``; the family's own :meth:`Family.predict` then runs it on
fake inputs of the recipe's shape (batch 1, latents and conditioning from
:meth:`Family.planning_inputs`), in bf16, with the latents requiring grad (the gradient a LoRA
needs flows through every block). Audio-video runs (``audio``) add the family's further streams
(:meth:`Family.planning_streams`, LTX-2's sound at the clip's duration) as ``streams=``, their
noisy inputs requiring grad too (the adapter covers those streams). ``saved_tensors_hooks`` see
every tensor autograd keeps for backward; their bytes are summed once per storage, parameters
excluded, and attributed to the block whose forward was running (forward hooks), or to
"outside" (embeddings, head).

Attention is counted as a flash kernel keeps it (q, k, v, out and a float32 logsumexp per head
and query), never as the math kernel's [heads, L, L] matrix: the trace replaces
``F.scaled_dot_product_attention`` by one without the mask argument, which on fake CPU tensors
dispatches to the fused (flash) CPU kernel and saves exactly those; a mask only changes values.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from finetune._quiet import held_back
from finetune.families.base import Components, Family, FullSize, ModelSpec, Stream
from finetune.memory.architecture import BLOCK_COUNT_KEYS, build_meta, keeps_fp32


@dataclass
class Trace:
    """Bytes autograd saves for one clip (batch 1). ``saved[kind]``: one block of that kind;
    ``inputs[kind]``: the activations entering one block of that kind that require grad (what a
    checkpointed block keeps); ``largest[kind]``: the largest single saved tensor of one block;
    ``outside``: saved outside the blocks (embeddings, head, shared rotary tables)."""

    saved: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, int] = field(default_factory=dict)
    largest: dict[str, int] = field(default_factory=dict)
    outside: int = 0


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class _ValueFree(TorchDispatchMode):
    """Answers the few ops whose result depends on tensor values, which fake tensors do not
    have: a tensor read as a Python scalar (``if mask.all():``) reads as 1/True, and ``nonzero``
    (also behind boolean-mask indexing) selects every position. Models that gather the valid
    prompt tokens by their mask (Mochi, HunyuanVideo-1.5) thus trace full-length prompts; where
    a model also gathers the padding side (HunyuanVideo-1.5), its text tokens count twice: an
    overestimate of at most the text length, against tens of thousands of video tokens."""

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


@contextlib.contextmanager
def _traceable(mode: FakeTensorMode):
    """Fake tensors, value-free answers (:class:`_ValueFree`) and SDPA without the mask, so the
    fused kernel is picked and counted (module docstring)."""
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        return real_sdpa(query, key, value, None, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        with mode, _ValueFree():
            yield
    finally:
        F.scaled_dot_product_attention = real_sdpa


def _fake_model(full: FullSize, dtype: torch.dtype, mode: FakeTensorMode) -> torch.nn.Module:
    """``full`` with one block per kind, fake parameters in the load dtype (float32 where the model
    keeps it), frozen."""
    ones = {k: 1 for k in BLOCK_COUNT_KEYS if isinstance(full.config.get(k), int) and full.config[k] > 1}
    meta = build_meta(full, **ones)
    import copy

    model = copy.deepcopy(meta)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(model, name, dtype) else dtype)
    model.requires_grad_(False)
    with mode:
        model.to_empty(device="cpu")
    return model


def _meta_components(fam: type[Family], parts: dict[str, FullSize], transformer: torch.nn.Module) -> Components:
    """Components whose transformer is the fake one-block model and whose other modules are the
    meta-built full-size ones (families read their configs in ``__init__``)."""
    mods = {n: build_meta(f) for n, f in parts.items() if n not in ("transformer", "transformer_2")}
    return Components(transformer=transformer, vae=mods.get("vae"), text_encoder=mods.get("text_encoder"),
                      tokenizer=None, scheduler=None, image_encoder=mods.get("image_encoder"),
                      text_encoder_2=mods.get("text_encoder_2"))


@functools.lru_cache(maxsize=64)
def trace_transformer(fam: type[Family], checkpoint: str, task: str, frames: int, height: int, width: int,
                      fps: float, dtype: torch.dtype = torch.bfloat16, audio: bool = False) -> Trace:
    """Trace one forward of ``checkpoint``'s transformer (module docstring); ``audio``: an
    audio-video step (``data.audio``). Cached per shape."""
    parts = fam.full_size_configs(task)[checkpoint]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = _fake_model(parts["transformer"], dtype, mode)
    family = fam(_meta_components(fam, parts, model), ModelSpec(pretrained=checkpoint, dtype=dtype, task=task))
    latent_shape, cond_shapes = fam.planning_inputs(task, frames, height, width, fam.max_sequence_length)
    kinds = {n: m[0] for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == 1}
    params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    out = Trace(saved=dict.fromkeys(kinds, 0), inputs=dict.fromkeys(kinds, 0), largest=dict.fromkeys(kinds, 0))
    seen: set[int] = set()
    current: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params and key not in seen:
            seen.add(key)
            if current:
                out.saved[current[-1]] += _nbytes(t)
                out.largest[current[-1]] = max(out.largest[current[-1]], _nbytes(t))
            else:
                out.outside += _nbytes(t)
        return t

    def enter(kind, module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
        out.inputs[kind] += sum(_nbytes(t) for t in {_storage_key(t): t for t in tensors}.values())
        current.append(kind)

    def leave(*_) -> None:
        current.pop()

    hooks = []
    for kind, block in kinds.items():
        hooks.append(block.register_forward_pre_hook(functools.partial(enter, kind), with_kwargs=True))
        hooks.append(block.register_forward_hook(leave))
    try:
        with _traceable(mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            latents = torch.zeros(latent_shape, dtype=dtype, requires_grad=True)
            cond = {k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in cond_shapes.items()}
            t = torch.full((1,), 500.0)
            shapes = fam.planning_streams(task, frames, height, width, fps) if audio else {}
            streams = {name: Stream(torch.zeros(shape, dtype=dtype, requires_grad=True), t, torch.zeros(shape))
                       for name, shape in shapes.items()}
            # streams= only when there are some: the protocol's predict takes it only then. The
            # warnings held back are about how this CPU trace computes, not about the user's run:
            # torch's CPU layer norm names the fused kernel it skips for a float input and bf16
            # weight (Kandinsky 5); CPU autocast refuses the float32 Mochi's rotary code asks for.
            with held_back(r"Mismatch dtype between input and weight",
                           r"In CPU autocast, but the target dtype is not supported"):
                family.predict(model, latents, t, cond, fps, **({"streams": streams} if streams else {}))
    finally:
        for h in hooks:
            h.remove()
    return out
