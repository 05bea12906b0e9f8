"""The memory planner: peak accelerator memory of a recipe per phase, predicted before any weight
loads, and the cheapest settings that make it fit a card with room to spare.

Every count comes from the real architecture (finetune/memory/architecture.py: the family's
full-size configs built on the meta device) and from a trace of the real training step
(finetune/memory/trace.py: the transformer at full width with the trainer's LoRA, CUDA autocast's
dtype rules, masks and dequantised weights as they run, forward, recomputation and backward,
the live bytes at each moment); nothing here is a table of model sizes.

Phases (batch ``optim.batch_size``, the recipe's frames x height x width):
  caching     text encoder(s), image encoder and VAE weights + the VAE's encode working memory
              (an estimate, not a trace: 3 feature maps of its first convolution's width over
              1 + temporal factor frames, the chunk causal video VAEs encode at a time, at the
              resolution after the VAE's own pixel patchify if it has one; with
              ``memory.vae_tiling`` on or auto, a GPU's default, over one tile of the VAE's own
              tile size instead of the whole frame)
  training    frozen transformer weights as loaded (dtype, quantisation: fp8 converts the block
              linears only; block swap; both experts unless ``memory.offload_idle_expert``), LoRA
              parameters (fp32, 4 B), their gradients (fp32, 4 B, one expert at a time), optimizer
              state (AdamW: 8 B/param, AdamW8bit: 2 B/param), and the traced live peak of the step's
              activations and temporaries (:func:`finetune.memory.trace.step_peak`)
  validation  only with ``validation.prompts``: the optimizer state, which stays on the card,
              plus the largest of the models the render brings in one at a time
              (finetune/memory/render.py): each text or image encoder (none for
              ``memory.text_encoder=cpu``, which runs in host memory), each transformer's
              frozen weights on the card (block swap stays on while rendering) with its LoRA and
              the traced peak of one denoising forward per classifier-free-guidance
              branch, or the VAE with its decode working memory (the encode estimate, tiled as for
              caching)
Each phase adds :data:`RUNTIME_OVERHEAD` (CUDA context, cuBLAS workspace). A plan fits a card of
V GiB when its peak plus the margin (``memory.margin_gb``, default :data:`MARGIN` of the card: the
allocator's fragmentation, the block-swap stream's own pool, what no trace sees) is at most V.

Host memory: block swap keeps the swapped blocks' frozen weights in pinned host memory (every
expert's), activation offload what the step saves (traced), a CPU text encoder its weights; the
plan lists them and raises HostMemoryShort when they exceed the machine's memory
(``memory.host_gb``, default this machine's).

Audio-video runs (``data.audio: true``, families with ``supports_audio``): the LoRA counts the
recipe's targets (``default_targets(audio=True)`` unless ``lora.targets``), the trace runs the
family's further streams (:meth:`Family.planning_streams`: LTX-2's sound at the clip's duration),
and caching and validation count the family's ``audio_vae`` weights (its encode working memory, a
log-mel spectrogram of a few seconds, is left out: megabytes).

Block swap (``memory.blocks_to_swap: N``, finetune/memory/blockswap.py): the last N blocks in
execution order live in host memory; at most two of them are on the card at once (the one
computing and the next one, being copied in). Bitsandbytes int8/nf4 weights trace as fp8 ones do
(dequantised per layer, nothing of them saved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from finetune.config import Recipe, _merge, parse_overrides, recipe_from_dict
from finetune.errors import UserError
from finetune.families.base import Components, Family, FullSize, ModelSpec
from finetune.memory.architecture import blocks_of, build_meta, lora_param_count, weight_bytes
from finetune.memory.blockswap import BlockSwapError
from finetune.memory.trace import StepEstimate, StepSettings, step_peak
from finetune.weights.vae import tile_size as vae_tile_size

GIB = 2 ** 30
RUNTIME_OVERHEAD = int(0.5 * GIB)
MARGIN = 0.06  # of the card, unless memory.margin_gb says otherwise
# the planner plans GPU runs, where model.dtype=auto is bf16
DTYPES = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIM_BYTES = {"adamw": 8, "adamw8bit": 2}
LORA_BYTES = 4  # fp32 masters, and fp32 gradients
# Settings the planner may choose that the trainer does not run yet (train_lora refuses them):
# key -> whether the recipe (with that key set) needs what is missing. Drop an entry when its
# feature lands. Block swap streams plain and torchao (fp8) weights, not bitsandbytes ones.
NOT_IMPLEMENTED: dict[str, Callable[[Recipe], bool]] = {
    "memory.blocks_to_swap": lambda r: r.memory.blocks_to_swap != 0 and r.model.quantization in ("int8", "nf4"),
}


class PlannerError(UserError):
    """The planner cannot plan this recipe (tiny model, unknown checkpoint, bad card size)."""


class InvalidVram(PlannerError):
    """The card size given is not a positive number of GiB."""


class DoesNotFit(PlannerError):
    """Even with every memory setting on, the recipe does not fit the card; names the closest
    setting and its predicted peak."""


class NotImplementedYet(UserError):
    """A memory setting the planner plans with but the trainer does not run yet."""


class HostMemoryShort(PlannerError):
    """What the plan keeps in host memory (pinned swapped blocks and offloaded activations, a CPU
    text encoder) exceeds the machine's memory."""


class TooManySwappedBlocks(BlockSwapError):
    """``memory.blocks_to_swap`` exceeds the transformer's block count, found from the full-size
    config before any weight loads; names the count and the largest valid value."""


@dataclass
class Phase:
    """One phase's resident bytes by item (label -> bytes) and its peak."""

    name: str
    items: list[tuple[str, int]] = field(default_factory=list)
    note: str = ""

    @property
    def peak(self) -> int:
        return sum(b for _, b in self.items)


@dataclass
class Plan:
    recipe: Recipe
    checkpoint: str
    tokens: int
    phases: list[Phase]
    vram_gb: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    stream_tokens: dict[str, int] = field(default_factory=dict)  # audio-video runs: tokens per further stream
    host: list[tuple[str, int]] = field(default_factory=list)  # what the run keeps in host memory, by item
    flops: int = 0  # traced FLOPs of one training step (forward, recomputation, backward)
    model_flops: int = 0  # the same without the recomputation (what MFU counts)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: p.peak).name

    @property
    def host_bytes(self) -> int:
        return sum(b for _, b in self.host)

    def margin(self, vram_gb: float) -> int:
        """Bytes left free on a card of ``vram_gb`` GiB (``memory.margin_gb``, or MARGIN of it)."""
        m = self.recipe.memory.margin_gb
        return int((m if m is not None else MARGIN * vram_gb) * GIB)

    def fits(self, vram_gb: float) -> bool:
        return self.peak + self.margin(vram_gb) <= vram_gb * GIB


# ---------------------------------------------------------------------------- counting


def check_vram(vram_gb: Any, where: str = "--vram") -> float:
    """``vram_gb`` as a float; raises InvalidVram unless it is a positive number."""
    try:
        value = float(vram_gb)
    except (TypeError, ValueError):
        raise InvalidVram(f"{where}={vram_gb!r}: give the card's memory in GiB, e.g. {where.lstrip('-')} 16") from None
    if not value > 0 or value != value:
        raise InvalidVram(f"{where}={vram_gb!r}: the card's memory must be a positive number of GiB (e.g. 16 or 24)")
    return value


def checkpoint_parts(recipe: Recipe) -> tuple[type[Family], str, dict[str, FullSize]]:
    """The family, checkpoint id and full-size components of ``recipe``. Raises PlannerError for
    tiny models and checkpoints the family has no configs for."""
    fam = recipe.family_cls()
    if recipe.model.tiny:
        raise PlannerError("model.tiny=true: the planner plans released checkpoints; tiny models fit anywhere "
                           "(remove --plan, or plan a recipe with model.tiny=false)")
    known = fam.full_size_configs(recipe.model.task)
    ckpt = recipe.pretrained
    if ckpt not in known:
        raise PlannerError(f"model.pretrained={ckpt!r}: no full-size config for it in {fam.name} "
                           f"(task {recipe.model.task}); the planner knows {', '.join(sorted(known))}")
    return fam, ckpt, known[ckpt]


def check_blocks_to_swap(recipe: Recipe) -> None:
    """Raise TooManySwappedBlocks if ``memory.blocks_to_swap`` exceeds the block count of the
    transformer that ``recipe`` loads, counted on the meta device from the family's full-size
    config (no weights). Tiny models and checkpoints without a full-size config are left to the
    check after loading (finetune/memory/blockswap.py)."""
    n = recipe.memory.blocks_to_swap
    if not n or recipe.model.tiny:
        return
    fam = recipe.family_cls()
    full = fam.full_size_configs(recipe.model.task).get(recipe.pretrained)
    if full is None:
        return
    blocks = blocks_of(full["transformer"], DTYPES[recipe.model.dtype], recipe.model.quantization)
    if n > blocks.total:
        lists = ", ".join(f"{k}: {v}" for k, v in blocks.counts.items())
        raise TooManySwappedBlocks(f"memory.blocks_to_swap={n}: the {fam.name} {recipe.pretrained} transformer has "
                                   f"{blocks.total} blocks ({lists}); set memory.blocks_to_swap to at most "
                                   f"{blocks.total}")


def step_settings(recipe: Recipe, train: bool = True, batch: int | None = None) -> StepSettings:
    """What of ``recipe`` shapes the traced step (finetune/memory/trace.py)."""
    quant = recipe.model.quantization
    m = recipe.memory
    return StepSettings(dtype=DTYPES[recipe.model.dtype], quantization="none" if quant == "none" else "fp8",
                        rank=recipe.lora.rank, alpha=float(recipe.lora.alpha), targets=tuple(recipe.lora_targets),
                        checkpointing=m.gradient_checkpointing and train, offload=m.activation_offload and train,
                        audio=recipe.data.audio, train=train, batch=batch or recipe.optim.batch_size)


def traced_step(recipe: Recipe, train: bool = True, batch: int | None = None) -> StepEstimate:
    """``recipe``'s traced step (``train`` False: one denoising forward of ``batch`` clips, as a
    render runs it)."""
    fam, ckpt, _ = checkpoint_parts(recipe)
    d = recipe.data
    return step_peak(fam, ckpt, recipe.model.task, d.frames, d.height, d.width, recipe.fps,
                     step_settings(recipe, train, batch))


def _vae_working(vae: torch.nn.Module, frames: int, height: int, width: int, temporal: int, dtype: torch.dtype,
                 tiled: bool = False) -> int:
    """Encode working memory estimate (module docstring); ``tiled``: one tile of the frame."""
    conv = next((m for m in vae.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)
    width_c = conv.out_channels if conv is not None else 128
    size = torch.empty((), dtype=dtype).element_size()
    patch = getattr(vae.config, "patch_size", None)  # VAEs that patchify pixels first convolve at 1/patch
    tile = vae_tile_size(vae) if tiled else None
    if tile is not None:
        height, width = min(height, tile[0]), min(width, tile[1])
    area = height * width // (patch * patch if isinstance(patch, int) and patch > 1 else 1)
    return 3 * width_c * min(frames, temporal + 1) * area * size


def _dtype_of(part: FullSize, dtype: torch.dtype) -> torch.dtype:
    return part.dtype or dtype


def _label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def plan_recipe(recipe: Recipe, vram_gb: float | None = None) -> Plan:
    """Predict every phase of ``recipe`` (module docstring). Loads no weights; raises PlannerError."""
    fam, ckpt, parts = checkpoint_parts(recipe)
    check_blocks_to_swap(recipe)
    d = recipe.data
    cache, enc_bytes, vae_work = caching_phase(recipe, d.frames)
    train, step = training_phase(recipe)
    phases = [cache, train]
    v = recipe.validation
    if v.prompts:
        phases.append(validation_phase(recipe, train, enc_bytes, vae_work))
    latent, _ = fam.planning_inputs(recipe.model.task, d.frames, d.height, d.width, fam.max_sequence_length)
    tokens = latent[2] * latent[3] * latent[4] // _patch_area(parts["transformer"])
    streams = fam.planning_streams(recipe.model.task, d.frames, d.height, d.width, recipe.fps) if d.audio else {}
    return Plan(recipe, ckpt, tokens, phases, vram_gb, stream_tokens={n: s[1] for n, s in streams.items()},
                host=host_items(recipe, enc_bytes, step.offloaded), flops=step.flops, model_flops=step.model_flops)


def host_items(recipe: Recipe, enc_bytes: dict[str, int], offloaded: int) -> list[tuple[str, int]]:
    """What the run keeps in host memory while training (module docstring)."""
    fam, ckpt, parts = checkpoint_parts(recipe)
    dtype, quant, mem = DTYPES[recipe.model.dtype], recipe.model.quantization, recipe.memory
    names = [n for n in ("transformer", "transformer_2") if n in parts]
    out = []
    swap = min(mem.blocks_to_swap, blocks_of(parts["transformer"], dtype, quant).total)
    if swap:  # every expert's blocks swap (validation renders them all)
        swapped = sum(blocks_of(parts[n], dtype, quant).swapped(swap)[0] for n in names)
        out.append((f"swapped blocks' frozen weights ({swap} per transformer, pinned)", swapped))
    if mem.activation_offload:
        out.append(("offloaded activations (pinned, traced)", offloaded))
    if mem.offload_idle_expert and len(names) > 1:
        out.append(("the idle expert's frozen weights", weight_bytes(build_meta(parts[names[1]]), dtype, quant)))
    if mem.text_encoder == "cpu":
        cpu = sum(weight_bytes(build_meta(parts[n]), _dtype_of(parts[n], dtype)) for n in enc_bytes
                  if n.startswith("text_encoder"))
        out.append(("text encoders in CPU memory (caching)", cpu))
    return out


def machine_memory_gb() -> float:
    """This machine's physical memory in GiB."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def check_host(plan: Plan) -> None:
    """Raise HostMemoryShort when the plan's host memory exceeds the machine's (``memory.host_gb``,
    else this machine's), with room for the process itself (10%)."""
    have = plan.recipe.memory.host_gb or machine_memory_gb()
    need = plan.host_bytes / GIB
    if need > 0.9 * have:
        biggest = max(plan.host, key=lambda it: it[1])
        raise HostMemoryShort(f"{plan.recipe.model.family} {plan.checkpoint}: the run keeps {need:.1f} GiB in host memory "
                              f"(largest: {biggest[0]}, {biggest[1] / GIB:.1f} GiB), more than 90% of the machine's "
                              f"{have:.1f} GiB; swap fewer blocks (memory.blocks_to_swap), turn off "
                              f"memory.activation_offload, or set memory.host_gb to the training machine's memory")


def resident_weight_bytes(recipe: Recipe, name: str) -> int:
    """The frozen weights of transformer ``name`` on the card: all of them, or under block swap
    (which stays on through validation renders) all but the last N blocks, two of which come
    back at a time (computing, prefetched)."""
    _, _, parts = checkpoint_parts(recipe)
    dtype, quant = DTYPES[recipe.model.dtype], recipe.model.quantization
    wb = weight_bytes(build_meta(parts[name]), dtype, quant)
    blocks = blocks_of(parts["transformer"], dtype, quant)
    swap = min(recipe.memory.blocks_to_swap, blocks.total)
    if swap:
        out, largest = blocks.swapped(swap)
        wb += min(2, swap) * largest - out
    return wb


def validation_phase(recipe: Recipe, train: Phase, enc_bytes: dict[str, int], vae_work: int) -> Phase:
    """A validation render (module docstring): the optimizer state plus the largest model in
    use, each model coming to the card only while it runs."""
    fam, _, parts = checkpoint_parts(recipe)
    v = recipe.validation
    branches = 2 if v.guidance > 1 else 1
    denoise = traced_step(recipe, train=False, batch=branches).peak
    lora = next(b for label, b in train.items if label.startswith("LoRA param"))
    stages = {n: b for n, b in enc_bytes.items() if n != "vae" and b}
    for n in (n for n in ("transformer", "transformer_2") if n in parts):
        stages[f"{n} + LoRA + denoising ({branches} guidance branch{'es' if branches > 1 else ''}, traced)"] = \
            resident_weight_bytes(recipe, n) + lora + denoise
    if "vae" in parts:
        stages["vae + decode working memory"] = enc_bytes["vae"] + vae_work
    largest = max(stages, key=stages.get)
    val = Phase("validation")
    val.items += [it for it in train.items if it[0].startswith("optimizer state")]
    val.items.append((f"largest model in use: {largest}", stages[largest]))
    val.items.append(("runtime overhead", RUNTIME_OVERHEAD))
    return val


def training_phase(recipe: Recipe) -> tuple[Phase, StepEstimate]:
    """Resident frozen transformer weights, the trained experts' LoRA, gradients and optimizer
    state, and the traced live peak of one step (module docstring); with the traced step."""
    fam, ckpt, parts = checkpoint_parts(recipe)
    dtype, o, mem, quant = DTYPES[recipe.model.dtype], recipe.optim, recipe.memory, recipe.model.quantization
    names = [n for n in ("transformer", "transformer_2") if n in parts]
    trained = [e.attr for e in _experts(fam, ckpt, recipe.model.task)
               if recipe.model.experts is None or e.name in recipe.model.experts]
    on_card = trained[:1] if (mem.offload_idle_expert and len(names) > 1) else names
    train = Phase("training")
    blocks = blocks_of(parts["transformer"], dtype, quant)
    swap = min(mem.blocks_to_swap, blocks.total)
    for n in on_card:
        label = f"{n} frozen weights ({quant if quant != 'none' else _label(dtype)}"
        train.items.append((label + (f", {swap} blocks swapped)" if swap else ")"), resident_weight_bytes(recipe, n)))
    lora_each = {n: lora_param_count(build_meta(parts[n]), recipe.lora_targets, recipe.lora.rank) for n in trained}
    lora_params = sum(lora_each.values())
    train.items += [
        (f"LoRA parameters (r={recipe.lora.rank}, {lora_params / 1e6:.1f}M, fp32)", lora_params * LORA_BYTES),
        ("LoRA gradients (fp32, one expert)", max(lora_each.values()) * LORA_BYTES),
        (f"optimizer state ({o.optimizer})", lora_params * OPTIM_BYTES[o.optimizer]),
    ]
    step = traced_step(recipe)
    how = "checkpointed" if mem.gradient_checkpointing else "no checkpointing"
    train.items += [(f"activations and temporaries (traced live peak; {how}"
                     f"{', offloaded' if mem.activation_offload else ''})", step.peak),
                    ("runtime overhead", RUNTIME_OVERHEAD)]
    return train, step


def caching_phase(recipe: Recipe, frames: int) -> tuple[Phase, dict[str, int], int]:
    """The caching phase of ``recipe`` at ``frames`` frames: (phase, encoder bytes by name,
    VAE working bytes)."""
    fam, _, parts = checkpoint_parts(recipe)
    dtype, d = DTYPES[recipe.model.dtype], recipe.data
    cache = Phase("caching")
    names = ("text_encoder", "text_encoder_2", "image_encoder", "vae") + (("audio_vae",) if d.audio else ())
    encoders = [n for n in names if n in parts]
    # memory.text_encoder: text encoders on the card in the load dtype, in CPU memory (nothing on
    # the card), or with int8/fp8 block weights (1 byte + a per-row scale, as the transformer's)
    mode = recipe.memory.text_encoder
    enc_bytes, labels = {}, {}
    for n in encoders:
        label = _label(_dtype_of(parts[n], dtype))
        if n.startswith("text_encoder") and mode == "cpu":
            enc_bytes[n], labels[n] = 0, "in CPU memory"
        elif n.startswith("text_encoder") and mode in ("int8", "fp8"):
            enc_bytes[n], labels[n] = weight_bytes(build_meta(parts[n]), _dtype_of(parts[n], dtype), mode), mode
        else:
            enc_bytes[n], labels[n] = weight_bytes(build_meta(parts[n]), _dtype_of(parts[n], dtype)), label
    for n in encoders:
        cache.items.append((f"{n} ({labels[n]})", enc_bytes[n]))
    vae_work = 0
    if "vae" in parts:
        vae = build_meta(parts["vae"])
        # the planner plans a GPU run, where memory.vae_tiling=auto tiles
        tiled = recipe.memory.vae_tiling != "off" and fam.vae_tiles and vae_tile_size(vae) is not None
        vae_work = _vae_working(vae, frames, d.height, d.width, fam.frame_rule.temporal_factor,
                                _dtype_of(parts["vae"], dtype), tiled)
        tile = f", tiled {vae_tile_size(vae)[0]}x{vae_tile_size(vae)[1]}" if tiled else ""
        cache.items.append((f"VAE encode working memory (estimate{tile})", vae_work))
    cache.items.append(("runtime overhead", RUNTIME_OVERHEAD))
    return cache, enc_bytes, vae_work


def _patch_area(part: FullSize) -> int:
    """Latent positions per token: the transformer's patch sizes (ints or [t, h, w])."""
    cfg = part.config
    p = cfg.get("patch_size", 1)
    if isinstance(p, (list, tuple)):
        return int(p[0] * p[1] * p[2])
    return int(p) * int(p) * int(cfg.get("patch_size_t") or 1)


def _experts(fam: type[Family], checkpoint: str, task: str) -> list:
    """``fam``'s experts without loading it: their names, attributes and ranges do not depend on
    weights, so a bare instance with empty components answers :meth:`Family.experts`."""
    probe = object.__new__(fam)
    probe.components = Components(None, None, None, None, None)
    probe.spec = ModelSpec(pretrained=checkpoint, task=task)
    return probe.experts()


# ---------------------------------------------------------------------------- search


def _with(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    items = [f"{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in overrides.items()]
    return recipe_from_dict(_merge(recipe.model_dump(mode="json"), parse_overrides(items)), source="planner")


def _current(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _stages(recipe: Recipe) -> list[tuple[str, Any]]:
    """The fixed order of cost: each (key, value) is added to all before it."""
    out: list[tuple[str, Any]] = [("memory.gradient_checkpointing", True), ("optim.optimizer", "adamw8bit")]
    if recipe.model.quantization == "none" and recipe.family_cls().fp8_ok:  # int8/nf4 store <= 1 B already
        out.append(("model.quantization", "fp8"))
    return out


def _runnable(recipe: Recipe) -> bool:
    """Whether the trainer runs ``recipe``'s memory settings (check_implemented passes)."""
    return not any(needs(recipe) for needs in NOT_IMPLEMENTED.values())


def _ok(plan: Plan, vram_gb: float) -> bool:
    """A plan the planner may propose: it fits with the margin, and the trainer runs it."""
    return plan.fits(vram_gb) and _runnable(plan.recipe)


def _min_swap(recipe: Recipe, base: dict[str, Any], vram_gb: float) -> tuple[dict[str, Any], Plan]:
    """``base`` plus the fewest blocks_to_swap that fit (or the most there are). Block swap streams
    fp8 weights, not bitsandbytes ones: an int8/nf4 recipe swaps with model.quantization=fp8."""
    fam, _, parts = checkpoint_parts(recipe)
    total = blocks_of(parts["transformer"], DTYPES[recipe.model.dtype], recipe.model.quantization).total
    swappable = dict(base)
    if _with(recipe, base).model.quantization in ("int8", "nf4"):
        if not fam.fp8_ok:  # bitsandbytes weights do not stream, and this family has no fp8: no swap
            return dict(base), plan_recipe(_with(recipe, base), vram_gb)
        swappable["model.quantization"] = "fp8"
    lo, hi = 0, max(total - 1, 0)
    best = None
    while lo <= hi:  # peak falls as N grows (past N = 2), so bisect on "fits"
        mid = (lo + hi) // 2
        trial = {**swappable, "memory.blocks_to_swap": mid} if mid else dict(base)
        plan = plan_recipe(_with(recipe, trial), vram_gb)
        if _ok(plan, vram_gb):
            best, hi = (trial, plan), mid - 1
        else:
            lo = mid + 1
    if best is None:
        trial = {**swappable, "memory.blocks_to_swap": max(total - 1, 0)}
        best = (trial, plan_recipe(_with(recipe, trial), vram_gb))
    return best


def _changed(recipe: Recipe, overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if _current(recipe, k) != v}


def choose_overrides(recipe: Recipe, vram_gb: float) -> Plan:
    """The plan of ``recipe`` with the cheapest overrides that fit ``vram_gb`` GiB (in
    ``plan.overrides``, only keys that change; empty if it fits as it is). Order of cost: for a
    caching phase that does not fit, the text encoder in fp8 or on the CPU first; then gradient
    checkpointing, AdamW8bit, fp8 weights, the fewest swapped blocks, activation
    offload, then fewer frames (with a warning). Deterministic. Raises DoesNotFit naming the
    closest setting and its peak, InvalidVram for a bad size."""
    vram_gb = check_vram(vram_gb)
    plan = plan_recipe(recipe, vram_gb)
    if _ok(plan, vram_gb):
        return plan
    room = vram_gb * GIB - plan.margin(vram_gb)
    base: dict[str, Any] = {}
    # cheaper text encoder settings than the recipe's, in order (a recipe already in fp8 or int8
    # can still go to the CPU)
    cheaper = {"gpu": ("fp8", "cpu"), "int8": ("cpu",), "fp8": ("cpu",)}.get(recipe.memory.text_encoder, ())
    if cheaper and caching_phase(recipe, 1)[0].peak > room:
        # the encoders alone are too big: the first lever is where the text encoder runs (on the
        # CPU, the closest setting, when even fp8 does not fit)
        fits = [m for m in cheaper
                if caching_phase(_with(recipe, {"memory.text_encoder": m}), 1)[0].peak <= room]
        base["memory.text_encoder"] = fits[0] if fits else "cpu"
    cache = caching_phase(_with(recipe, base), 1)[0]
    if cache.peak > room:  # no training setting changes the encoders
        biggest = max(cache.items, key=lambda it: it[1])
        closest = ", ".join(f"{k}={_fmt(v)}" for k, v in _changed(recipe, base).items()) or "the recipe as it is"
        raise DoesNotFit(f"{recipe.model.family} {plan.checkpoint}: the caching phase alone needs "
                         f"{cache.peak / GIB:.2f} GiB (its largest part: {biggest[0]}, {biggest[1] / GIB:.2f} GiB), "
                         f"more than {vram_gb:g} GiB, with any training setting; the closest is {closest}, "
                         f"predicted peak {cache.peak / GIB:.2f} GiB (caching). Encode on a larger card (the cache "
                         f"is reused)")
    for key, value in _stages(recipe):
        base[key] = value
        trial = _changed(recipe, base)
        plan = plan_recipe(_with(recipe, trial), vram_gb)
        if _ok(plan, vram_gb):
            plan.overrides = trial
            return plan
    for offload in (False, True):
        if offload:
            base["memory.activation_offload"] = True
        trial, plan = _min_swap(recipe, _changed(recipe, base), vram_gb)
        if _ok(plan, vram_gb):
            plan.overrides = _changed(recipe, trial)
            return plan
    rule, frames = recipe.family_cls().frame_rule, recipe.data.frames
    floor = recipe.family_cls().min_frames(recipe.model.task, recipe.model.cond_frames)
    shorter = list(range(frames - rule.temporal_factor, floor - 1, -rule.temporal_factor))
    found = None
    lo, hi = 0, len(shorter) - 1
    while lo <= hi:  # the longest clip that fits: the peak grows with the frames, so bisect
        mid = (lo + hi) // 2
        trial, plan = _min_swap(recipe, {**_changed(recipe, base), "data.frames": shorter[mid]}, vram_gb)
        if _ok(plan, vram_gb):
            found, hi = (trial, plan, shorter[mid]), mid - 1
        else:
            lo = mid + 1
    if found is not None:
        trial, plan, frames = found
        plan.overrides = _changed(recipe, trial)
        plan.warnings.append(f"data.frames lowered from {recipe.data.frames} to {frames} to fit {vram_gb:g} GiB: "
                             f"the LoRA sees shorter clips than the recipe asks for")
        return plan
    closest = ", ".join(f"{k}={_fmt(v)}" for k, v in _changed(recipe, trial).items())
    raise DoesNotFit(f"{recipe.model.family} {plan.checkpoint}: does not fit {vram_gb:g} GiB even with every memory "
                     f"setting on; the closest is {closest or 'the recipe as it is'}, predicted peak "
                     f"{plan.peak / GIB:.2f} GiB ({plan.peak_phase}) + margin {plan.margin(vram_gb) / GIB:.2f} GiB. "
                     f"Use a larger card, a smaller size (data.height/data.width) or a smaller checkpoint")


# ---------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def format_plan(plan: Plan, source: str = "") -> str:
    """The plan as a readable table (GiB), its peak, fit, overrides and warnings."""
    r, d = plan.recipe, plan.recipe.data
    head = (f"memory plan{' for ' + source if source else ''}: {r.model.family} {plan.checkpoint} ({r.model.task}), "
            f"{d.frames} frames x {d.height}x{d.width}, batch {r.optim.batch_size}, {plan.tokens:,} video tokens"
            + "".join(f" + {n:,} {name} tokens" for name, n in plan.stream_tokens.items()))
    width = max(len(label) for p in plan.phases for label, _ in p.items) + 2
    lines = [head, f"  {'phase':<12}{'item':<{width}}{'GiB':>8}"]
    for p in plan.phases:
        for i, (label, b) in enumerate(p.items):
            lines.append(f"  {p.name if i == 0 else '':<12}{label:<{width}}{b / GIB:>8.2f}")
        lines.append(f"  {'':<12}{'= phase peak':<{width}}{p.peak / GIB:>8.2f}")
    lines.append(f"predicted peak: {plan.peak / GIB:.2f} GiB ({plan.peak_phase})")
    if plan.vram_gb:
        margin = plan.margin(plan.vram_gb)
        how = "memory.margin_gb" if r.memory.margin_gb is not None else f"{MARGIN:.0%} of the card"
        lines.append(f"margin: {margin / GIB:.2f} GiB ({how}: fragmentation, kernel workspaces, what no trace sees)")
        spare = plan.vram_gb - (plan.peak + margin) / GIB
        lines.append(f"card: {plan.vram_gb:g} GiB -> " + (f"fits ({spare:.2f} GiB to spare after the margin)"
                                                           if spare >= 0 else f"does not fit ({-spare:.2f} GiB over)"))
    if plan.host:
        lines.append(f"host memory: {plan.host_bytes / GIB:.2f} GiB ("
                     + ", ".join(f"{label} {b / GIB:.2f}" for label, b in plan.host) + ")")
    if plan.flops:
        lines.append(f"step FLOPs (traced): {plan.flops / 1e12:,.1f} TFLOP as run, {plan.model_flops / 1e12:,.1f} "
                     f"without the recomputation")
    if plan.overrides:
        lines.append("overrides to add (the cheapest that fit):")
        lines += [f"  {k}={_fmt(v)}" for k, v in plan.overrides.items()]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """``recipe`` with ``overrides`` (dotted key -> value) applied and validated."""
    return _with(recipe, overrides) if overrides else recipe


def check_implemented(recipe: Recipe) -> None:
    """Raise NotImplementedYet for memory settings the trainer does not run yet."""
    bad = [f"{k}={_fmt(_current(recipe, k))}" for k, needs in NOT_IMPLEMENTED.items() if needs(recipe)]
    if bad:
        raise NotImplementedYet(f"{', '.join(bad)} with model.quantization={recipe.model.quantization}: planned by "
                                f"the memory planner but not implemented by the trainer yet; remove "
                                f"{'it' if len(bad) == 1 else 'them'}, use model.quantization=fp8 (or plan with a "
                                f"larger --vram)")


def run_planner(recipe: Recipe, source: str, vram: Any = None, apply: bool = False) -> Recipe:
    """``train_lora.py`` glue: print the plan of ``recipe`` for ``vram`` GiB (else
    ``memory.vram_gb``; no card = just the table). With ``apply`` (``memory.auto``) return the
    recipe with the chosen overrides; otherwise return it unchanged. Raises PlannerError."""
    if vram is None and recipe.memory.vram_gb is None:
        if apply:
            raise PlannerError(f"{source}: memory.auto=true needs memory.vram_gb (or --vram): the card's memory in GiB")
        print(format_plan(plan_recipe(recipe), source))
        return recipe
    vram_gb = check_vram(vram if vram is not None else recipe.memory.vram_gb,
                         "--vram" if vram is not None else "memory.vram_gb")
    as_is = plan_recipe(recipe, vram_gb)
    print(format_plan(as_is, source))
    plan = as_is if _ok(as_is, vram_gb) else choose_overrides(recipe, vram_gb)  # DoesNotFit after the table
    if plan is not as_is:
        print(f"\nwith the overrides:\n{format_plan(plan, source)}")
    try:
        check_host(plan)
    except HostMemoryShort as e:
        if apply:  # about to train here: stop before any weight loads
            raise
        print(f"warning: {e}")  # --plan may be run away from the training machine
    return apply_overrides(recipe, plan.overrides) if apply else recipe
