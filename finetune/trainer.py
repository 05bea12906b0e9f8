"""The LoRA trainer: one flat loop under accelerate, reaching model code only through the
family protocol.

Determinism: the data order, noise, timesteps and dropout of optimizer step ``s`` are drawn from
seeds derived from (optim.seed, s, micro-batch, process), not from a running RNG, so a run
resumed from a checkpoint at step s continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from peft import LoraConfig as PeftLoraConfig
from tqdm.auto import tqdm

from finetune import checkpoint as ckpt
from finetune import skips
from finetune.cache import CacheKey, CachedDataset, build_cache, collate
from finetune.config import Recipe
from finetune.data import Clip, aspect_mismatches, clips_cache_dir, load_clips, load_manifest, split_validation
from finetune.errors import DataError, TrainingDiverged
from finetune.export import RunInfo, adapter_file_name, save_adapters, write_text_atomic
from finetune.families.base import Expert, Family, ModelSpec
from finetune.memory import runtime as memory_runtime
from finetune.memory.lora import train_in_fp32
from finetune.runlock import RunLock
from finetune.stopping import GracefulStop
from finetune.video import side_by_side

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainResult:
    run_dir: Path
    adapter: Path  # the first expert's adapter file
    steps: int
    start_step: int
    last_loss: float
    family: Family  # encoders released; components.transformer is the unwrapped, adapted model
    dataset: CachedDataset
    val_dataset: CachedDataset | None = None  # held-out clips (data.validation_split / validation_manifest)


def compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``model.dtype`` on ``device``: ``auto`` is bf16 on a GPU and fp32 elsewhere (half precision
    on a CPU is slow); an explicit dtype is used wherever it runs."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def _label(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def model_spec(recipe: Recipe, device: torch.device) -> ModelSpec:
    return ModelSpec(pretrained=recipe.pretrained, revision=recipe.model.revision, tiny=recipe.model.tiny,
                     tiny_seed=recipe.model.tiny_seed, dtype=compute_dtype(recipe.model.dtype, device),
                     quantization=recipe.model.quantization, task=recipe.model.task,
                     cond_frames=recipe.model.cond_frames, text_encoder=recipe.memory.text_encoder,
                     vae_tiling=recipe.memory.vae_tiling, weights=recipe.model.weights)


def cache_key(recipe: Recipe, family: Family) -> CacheKey:
    spec = family.spec
    return CacheKey(family=recipe.model.family, model_id=family.encoders_id(), revision=spec.revision,
                    frames=recipe.data.frames, height=recipe.data.height, width=recipe.data.width, fps=recipe.fps,
                    task=spec.task,
                    cond_frames=family.cond_frames if family.task_input(spec.task) == "video" else None,
                    audio=recipe.data.audio, vae_tiling=family.vae_tiling_on())


def trained_experts(recipe: Recipe, family: Family) -> list[Expert]:
    """The experts this run trains: those ``model.experts`` names, or all of the model's."""
    experts = family.experts()
    wanted = recipe.model.experts
    return [e for e in experts if wanted is None or e.name in wanted]


def default_cache_dir(recipe: Recipe) -> Path:
    return Path(recipe.cache.dir) if recipe.cache.dir else clips_cache_dir(recipe.data.manifest, recipe.data.dataset)


def add_lora(transformer: torch.nn.Module, recipe: Recipe) -> list[torch.nn.Parameter]:
    """Attach a PEFT LoRA adapter named "default" (from ``lora.init_from`` if set); returns its
    trainable parameters, float32 masters whose layers compute in the activation dtype under
    autocast (:func:`finetune.memory.lora.train_in_fp32`). Works on a model built on the meta
    device or with fake weights too (the planner traces it)."""
    if recipe.lora.init_from:
        from finetune.lora_formats import add_lora_from_file

        add_lora_from_file(transformer, recipe.lora, recipe.lora_targets, recipe.family_cls().comfyui_key_map())
    else:
        transformer.add_adapter(PeftLoraConfig(
            r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=recipe.lora_targets, init_lora_weights=True,
        ))
    # Trainable weights in fp32 even when the frozen base is bf16 (updates this small vanish in bf16),
    # computing in the activation dtype under autocast (finetune/memory/lora.py).
    return train_in_fp32(transformer)


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # imported here: only this optimizer needs it

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, total, shape = recipe.optim.warmup_steps, recipe.optim.steps, recipe.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if shape == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


def batch_indices(n_items: int, seed: int, micro_step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Indices for one process's micro-batch: positions in an endless stream of seeded
    permutations (one per epoch), so any step's batch can be recomputed on resume."""
    out = []
    for j in range(batch_size):
        pos = (micro_step * world + rank) * batch_size + j
        epoch, k = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[k]))
    return out


def _training_sigmas(recipe: Recipe, family: Family, u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return family.training_sigmas(u, shape, recipe.optim.logit_mean, recipe.optim.logit_std)


def uniform_range(recipe: Recipe, family: Family, expert: Expert, shape: tuple[int, ...]) -> tuple[float, float]:
    """The interval of ``u`` whose training sigmas fall in ``expert``'s range. The family's map
    u -> sigma is monotonic, so bisection finds each end; the full range for a single expert."""

    def inverse(sigma: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if float(_training_sigmas(recipe, family, torch.tensor([mid]), shape)[0]) < sigma:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if expert.low <= 0.0 else inverse(expert.low)
    high = 1.0 if expert.high >= 1.0 else inverse(expert.high)
    return low, high


def sample_sigmas(recipe: Recipe, family: Family, shape: tuple[int, ...], gen: torch.Generator,
                  u_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Training sigmas [B] as the family samples them, restricted to ``u_range`` of its
    uniform input (an expert's share of the distribution)."""
    lo, hi = u_range
    u = lo + (hi - lo) * torch.rand(shape[0], generator=gen)
    return _training_sigmas(recipe, family, u, shape)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in fp32 over the positions where ``mask`` (broadcastable) is 1."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    weight = mask.float().expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def denoising_loss(family: Family, transformer, batch: dict, sigmas: torch.Tensor, noise: torch.Tensor,
                   fps: float) -> torch.Tensor:
    """MSE between the prediction and the family's target (flow-matching velocity, or its own),
    in fp32, over the positions the family counts (clean conditioning frames left out); plus each
    further stream's (audio) weighted MSE."""
    latents = batch["latents"]
    cond = {k: v for k, v in batch.items() if k != "latents"}
    noised = family.noisy_input_and_target(latents, noise, sigmas, cond)
    if not noised.streams:
        pred = family.predict(transformer, noised.noisy, noised.timesteps, cond, fps)
        return masked_mse(pred, noised.target, noised.loss_mask)
    pred, stream_preds = family.predict(transformer, noised.noisy, noised.timesteps, cond, fps, streams=noised.streams)
    loss = masked_mse(pred, noised.target, noised.loss_mask)
    for name, s in noised.streams.items():
        loss = loss + s.weight * masked_mse(stream_preds[name], s.target, None)
    return loss


def fixed_timestep_loss(family: Family, transformer, batch: dict, fps: float, seed: int = 1234,
                        expert: Expert | None = None, recipe: Recipe | None = None) -> float:
    """Denoising loss at fixed noise, averaged over fixed sigmas: the 10%..90% quantiles of the
    family's training distribution (of ``expert``'s share of it, if given). Comparable across
    models, so it tells whether an adapter learned its clips. batch: as from ``collate``."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(batch["latents"].shape)
    mean, std = (recipe.optim.logit_mean, recipe.optim.logit_std) if recipe else (0.0, 1.0)
    lo, hi = uniform_range(recipe, family, expert, shape) if (expert and recipe) else (0.0, 1.0)
    quantiles = lo + (hi - lo) * torch.linspace(0.1, 0.9, 5)
    losses = []
    with torch.no_grad():
        for s in family.training_sigmas(quantiles, shape, mean, std).tolist():
            noise = torch.randn(shape, generator=gen).to(batch["latents"])
            sigmas = torch.full((shape[0],), s, device=batch["latents"].device)
            losses.append(denoising_loss(family, transformer, batch, sigmas, noise, fps).item())
    return sum(losses) / len(losses)


def write_metrics(run_dir: Path, step: int, loss: float, grad_norm: float, seconds: float,
                  device: torch.device, pinned: int = 0) -> None:
    """Append step ``step``'s figures to ``<run>/metrics.jsonl`` (what bench/memory.py reads): loss,
    gradient norm, seconds, the host bytes block swap and activation offload hold (``pinned``,
    GiB), and on a GPU the allocated and reserved peaks since training began (GiB), each a JSON
    line."""
    import json

    row = {"step": step, "loss": loss, "grad_norm": grad_norm, "seconds": seconds, "pinned_gib": pinned / 2**30}
    if device.type == "cuda":
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


def route(widths: list[float], seed: int, step: int, micro: int) -> int:
    """Index of the expert for micro-batch ``micro`` of step ``step``: drawn with probability
    proportional to ``widths`` (each expert's share of the training distribution), from a seed
    that does not depend on the process, so every rank runs the same expert and DDP stays in step."""
    if len(widths) == 1:
        return 0
    gen = torch.Generator().manual_seed(step_seed(seed, step, micro, 0) ^ 0x5EED)
    r = float(torch.rand(1, generator=gen)) * sum(widths)
    for i, w in enumerate(widths):
        r -= w
        if r < 0:
            return i
    return len(widths) - 1


def place_experts(accelerator: Accelerator, transformers: list, active: int) -> None:
    """``memory.offload_idle_expert``: the step's expert on the accelerator, the others in CPU
    memory (their adapters get no gradient this step, so the optimizer leaves them alone)."""
    for i, t in enumerate(transformers):
        model = accelerator.unwrap_model(t)
        target = accelerator.device if i == active else torch.device("cpu")
        if next(model.parameters()).device != target:
            model.to(target)


def accumulate_gradients(accelerator: Accelerator, family: Family, transformers: list, experts: list[Expert],
                         dataset: CachedDataset, recipe: Recipe, step: int) -> float:
    """Forward and backward over the ``optim.grad_accum`` micro-batches of optimizer step ``step``;
    returns the loss averaged over micro-batches and processes. The step trains one of
    ``experts`` (``transformers`` in the same order), picked with probability equal to its share of
    the noise distribution, with every sigma drawn from that share. Batches, noise, timesteps,
    routing and dropout come from seeds derived from the step, so a resumed run draws the same ones."""
    o, device = recipe.optim, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    total = torch.zeros((), device=device)
    ranges: dict[tuple, list[tuple[float, float]]] = {}
    k = None
    for micro in range(o.grad_accum):
        seed = step_seed(o.seed, step, micro, rank)
        torch.manual_seed(seed)  # LoRA dropout
        gen = torch.Generator().manual_seed(seed)
        idx = batch_indices(len(dataset), o.seed, step * o.grad_accum + micro, o.batch_size, rank, world)
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}
        shape = tuple(batch["latents"].shape)
        if shape not in ranges:
            ranges[shape] = [uniform_range(recipe, family, e, shape) for e in experts]
        if k is None:  # one expert per optimizer step: its optimizer state and (offloaded) weights stay put
            k = route([hi - lo for lo, hi in ranges[shape]], o.seed, step, 0)
            if recipe.memory.offload_idle_expert:
                place_experts(accelerator, transformers, k)
        transformer = transformers[k]
        sigmas = sample_sigmas(recipe, family, shape, gen, ranges[shape][k]).to(device)
        noise = torch.randn(shape, generator=gen).to(device, batch["latents"].dtype)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = accelerator.no_sync(transformer) if micro < o.grad_accum - 1 else nullcontext()
        with sync, accelerator.autocast():
            loss = denoising_loss(family, transformer, batch, sigmas, noise, recipe.fps) / o.grad_accum
        accelerator.backward(loss)
        total += loss.detach()
    return accelerator.reduce(total, reduction="mean").item()


def mixed_precision(recipe: Recipe, device_type: str) -> str:
    """``memory.mixed_precision`` resolved: ``auto`` autocasts to bf16 on a GPU, and on a CPU to the
    half dtype ``model.dtype`` asks for (none for fp32)."""
    mp = recipe.memory.mixed_precision
    if mp != "auto":
        return mp
    if device_type == "cuda":
        return "bf16"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype(recipe.model.dtype, device_type), "no")


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    mp = mixed_precision(recipe, "cuda" if torch.cuda.is_available() else "cpu")
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mp and shared.get("num_processes", 1) == 1:
        # a second run in one process (a notebook, the tests, gpu_check) with another precision:
        # accelerate keeps the first run's state and refuses to change it; one process has
        # nothing to keep in step, so start its state afresh
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mp, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )


def bucket_keys(recipe: Recipe, family: Family, clips: list[Clip]) -> list[CacheKey]:
    """One cache key per clip at the clip's own manifest size (data.buckets). Raises DataError
    naming the clips whose size is unknown or breaks the family's size rule."""
    base, f = cache_key(recipe, family), family.spatial_factor
    bad = [c for c in clips if c.size is None or c.size[0] % f or c.size[1] % f]
    if bad:
        shown = ", ".join(f"{c.path.name} ({'no width/height' if c.size is None else f'{c.size[0]}x{c.size[1]}'})"
                          for c in bad[:3])
        raise DataError(f"data.buckets=true: {len(bad)} of {len(clips)} clips have no size in the manifest or one "
                        f"that is not a multiple of {f} for {family.name}: {shown}; re-cut them with data_prep "
                        f"for --family {family.name}, or set data.buckets=false")
    return [replace(base, width=c.size[0], height=c.size[1]) for c in clips]


def training_and_held_out(recipe: Recipe) -> tuple[list[Clip], list[Clip]]:
    """The clips to train on and those held out for val_loss (``data.validation_manifest``, or a
    seeded ``data.validation_split`` of the manifest). Raises DataError (manifests, split)."""
    clips = load_clips(recipe.data.manifest, recipe.data.dataset, recipe.data.trigger)
    if recipe.data.validation_manifest:
        return clips, load_manifest(recipe.data.validation_manifest, recipe.data.trigger)
    return split_validation(clips, recipe.data.validation_split, recipe.optim.seed)


def prepare_data(recipe: Recipe, family: Family, accelerator: Accelerator) -> tuple[CachedDataset,
                                                                                    CachedDataset | None]:
    """Manifests -> cached latents and text embeddings of the training clips and of the held-out
    ones (None if there are none): held-out clips are encoded like the others but never trained
    on. The main process encodes; others reuse."""
    train_clips, held_out = training_and_held_out(recipe)
    clips = train_clips + held_out
    total, misfits = len(clips), []
    if recipe.data.buckets and not recipe.data.strict:  # a clip buckets cannot take is skipped, not fatal
        clips, misfits = skips.bucket_misfits(clips, family.spatial_factor, family.name)
    keys = bucket_keys(recipe, family, clips) if recipe.data.buckets else cache_key(recipe, family)
    cropped = [] if recipe.data.buckets else aspect_mismatches(clips, recipe.data.width, recipe.data.height)
    if cropped:
        accelerator.print(
            f"note: {len(cropped)} of {len(clips)} clips are not {recipe.data.width}x{recipe.data.height}-shaped "
            f"(e.g. {cropped[0].path.name} is {cropped[0].size[0]}x{cropped[0].size[1]}) and will be centre-cropped; "
            f"cut them at that size (python -m data_prep prepare ... --size {recipe.data.width}x{recipe.data.height} "
            f"--buckets fixed) to keep the whole frame"
        )
    with accelerator.main_process_first():
        entries, stats = build_cache(family, clips, keys, default_cache_dir(recipe),
                                     show_progress=accelerator.is_local_main_process)
    if accelerator.is_main_process:
        print(f"cache: {stats.latents_computed} clips encoded, {stats.latents_reused} reused; "
              f"{stats.text_computed} prompts encoded, {stats.text_reused} reused"
              + (f"; {stats.damaged} damaged entries recomputed" if stats.damaged else ""))
    skipped = misfits + stats.skipped
    warning = skips.report_skipped(skipped, total, Path(recipe.output.dir), recipe.data.manifest or recipe.data.dataset,
                                   recipe.data.strict, write=accelerator.is_main_process)
    if warning:
        accelerator.print(warning)
    # build_cache keeps the order of the clips it could use: the held-out ones come last.
    gone = {id(c) for c, _ in skipped}
    n_val = sum(id(c) not in gone for c in held_out)
    if held_out:
        accelerator.print(f"validation: {n_val} of {len(entries)} clips held out from training for val_loss")
    train_entries, val_entries = entries[:len(entries) - n_val], entries[len(entries) - n_val:]
    return CachedDataset(train_entries * recipe.data.repeats), (CachedDataset(val_entries) if val_entries else None)


def train(recipe: Recipe, resume: str | None = None, limit_vram_gb: float | None = None) -> TrainResult:
    """Train a LoRA as ``recipe`` says. ``resume``: None, "latest" or a checkpoint folder;
    ``limit_vram_gb``: use at most that much of the GPU (finetune.memory.runtime.limit_vram).

    Raises: DataError (manifest, clips), CheckpointError (resume), TrainingDiverged (NaN/inf loss),
    RunLocked (another run uses output.dir), DiskSpaceError, TrainingStopped (SIGINT/SIGTERM, after
    saving a checkpoint and the adapter).
    """
    with ExitStack() as cleanup:  # the run lock and the signal handlers go however training ends
        return _train(recipe, resume, cleanup, limit_vram_gb)


def _train(recipe: Recipe, resume: str | None, cleanup: ExitStack, limit_vram_gb: float | None = None) -> TrainResult:
    # 1. Run folder, accelerator, resolved recipe.
    run_dir = Path(recipe.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start_ckpt = ckpt.resolve_resume(run_dir, resume) if resume else None
    accelerator = make_accelerator(recipe, run_dir)
    device, world = accelerator.device, accelerator.num_processes
    if limit_vram_gb is not None:  # before anything is on the card
        memory_runtime.limit_vram(limit_vram_gb, device)
    if accelerator.is_main_process:
        cleanup.enter_context(RunLock(run_dir))  # one run per output.dir
    stop = cleanup.enter_context(GracefulStop())
    for line in ckpt.check_resume_recipe(start_ckpt, recipe.model_dump(mode="json")) if start_ckpt else []:
        accelerator.print(line)
    if accelerator.is_main_process:
        write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
    compute = {"bf16": "bf16", "fp16": "fp16"}.get(accelerator.mixed_precision,
                                                   _label(compute_dtype(recipe.model.dtype, device)))
    accelerator.print(f"training on {world} process{'es' if world > 1 else ''} ({device.type}, {compute})")

    # 2. Base model through the family protocol.
    family_cls = recipe.family_cls()
    spec = model_spec(recipe, device)
    family = family_cls.load(spec, device=device, transformer_device=memory_runtime.transformer_device(recipe.memory,
                                                                                                       device))

    # 3. Data: manifest -> cache; then the encoders leave accelerator memory (kept in RAM only
    #    when validation samples will need them).
    dataset, val_dataset = prepare_data(recipe, family, accelerator)
    if recipe.validation.prompts:
        family.move_encoders("cpu")
    else:
        family.release_encoders()

    # 4. LoRA on each trained expert (its init seeded), gradient checkpointing, block swap and activation
    #    offload, optimizer, LR schedule.
    experts = trained_experts(recipe, family)
    models = [getattr(family.components, e.attr) for e in experts]
    torch.manual_seed(recipe.optim.seed)
    params = []
    for model in models:
        params += add_lora(model, recipe)
        if recipe.memory.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
    # block swap and activation offload on every expert (validation renders them all), then onto the device
    runtime = memory_runtime.apply(recipe.memory, {e.attr: getattr(family.components, e.attr) for e in family.experts()},
                                   device)
    optimizer = make_optimizer(params, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    *transformers, optimizer, scheduler = accelerator.prepare(*models, optimizer, scheduler)
    ckpt.register_lora_hooks(accelerator, transformers)

    # 5. Resume: weights, optimizer, scheduler and RNG from the checkpoint; step counter continues.
    start_step = 0
    if start_ckpt is not None:
        start_step = ckpt.load_checkpoint(accelerator, start_ckpt)
        accelerator.print(f"resumed from {start_ckpt} at step {start_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config={"lr": recipe.optim.lr, "rank": recipe.lora.rank})

    # 6. The loop (val_loss on the held-out clips before the first step, and with the samples).
    o = recipe.optim
    if device.type == "cuda":  # the peaks logged from here are the training steps', not the caching's
        torch.cuda.reset_peak_memory_stats(device)
    base_samples: dict[int, torch.Tensor] = {}  # base-model renders of the validation prompts, made once
    if val_dataset is not None and start_step == 0:
        log_validation_loss(accelerator, family, transformers, experts, val_dataset, recipe, 0)
    bar = tqdm(range(start_step, o.steps), initial=start_step, total=o.steps, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    loss_value = float("nan")
    stopped_at = None
    bad_in_row = 0
    names = {id(p): f"{e.attr}.{n}" for e, m in zip(experts, models) for n, p in m.named_parameters() if p.requires_grad}
    stop.install()  # from here a SIGINT/SIGTERM ends the run after the current step, saved
    for step in bar:
        t0 = time.perf_counter()
        loss_value = accumulate_gradients(accelerator, family, transformers, experts, dataset, recipe, step)
        grad_norm = _clip(accelerator, params, o.max_grad_norm) if math.isfinite(loss_value) else float("nan")
        if math.isfinite(grad_norm) or accelerator.scaler is not None:  # fp16: the grad scaler skips inf steps
            optimizer.step()
            bad_in_row = 0
        else:  # skip the update: the weights, and so any checkpoint made from them, stay good
            bad_in_row += 1
            check_bad_steps(bad_in_row, step, loss_value, params, names, o, run_dir, accelerator)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels, the optimizer's included, are in its time
        seconds = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if done % recipe.output.log_every == 0:
            accelerator.log({"loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                             "seconds_per_step": seconds, "peak_memory_gb": peak_memory_gb(device)}, step=done)
        if accelerator.is_main_process:
            write_metrics(run_dir, done, loss_value, grad_norm, seconds, device, runtime.pinned_bytes())
        if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < o.steps:
            ckpt.save_checkpoint(accelerator, run_dir, done, recipe.checkpoint.keep_last)
        v = recipe.validation
        if v.prompts and (done == o.steps or (v.every and done % v.every == 0)):
            render_samples(accelerator, family, transformers, recipe, done, dataset, base_samples)
        if val_dataset is not None and (done == o.steps or (v.every and done % v.every == 0)):
            log_validation_loss(accelerator, family, transformers, experts, val_dataset, recipe, done)
        if stop.requested(accelerator) and done < o.steps:
            stopped_at = ckpt.save_checkpoint(accelerator, run_dir, done, recipe.checkpoint.keep_last)
            break

    # 7. Final adapters (one file per trained expert) and the run description.
    accelerator.wait_for_everyone()
    adapters = {e.attr: adapter_file_name(e.attr) for e in experts}
    if accelerator.is_main_process:
        info = RunInfo(family=recipe.model.family, base_model=spec.pretrained, revision=spec.revision,
                       tiny=spec.tiny, tiny_seed=spec.tiny_seed, trigger=recipe.data.trigger, steps=o.steps,
                       weight_name=adapters[experts[0].attr], recipe=recipe.model_dump(mode="json"),
                       task=spec.task, adapters=adapters, weights=spec.weights)
        save_adapters({e.attr: accelerator.unwrap_model(t) for e, t in zip(experts, transformers)}, run_dir, info,
                      comfyui_key_maps=comfyui_key_maps(family_cls, experts))
    accelerator.end_training()
    for e, t in zip(experts, transformers):
        setattr(family.components, e.attr, accelerator.unwrap_model(t))
    if stopped_at is not None:
        raise stop.stopped(accelerator, done, o.steps, stopped_at, [run_dir / a for a in adapters.values()])
    return TrainResult(run_dir=run_dir, adapter=run_dir / adapters[experts[0].attr], steps=o.steps,
                       start_step=start_step, last_loss=loss_value, family=family, dataset=dataset,
                       val_dataset=val_dataset)


def comfyui_key_maps(family_cls: type[Family], experts: list[Expert]) -> dict:
    """Each trained expert's ComfyUI key map; none (with a note) for a family that has no map yet,
    so a finished run still writes its diffusers adapter."""
    try:
        return {e.attr: family_cls.comfyui_key_map(e.attr) for e in experts}
    except NotImplementedError as e:
        print(f"note: no ComfyUI file written: {e}")
        return {}


def render_samples(accelerator: Accelerator, family: Family, transformers: list, recipe: Recipe, step: int,
                   dataset: CachedDataset | None = None, base_samples: dict[int, torch.Tensor] | None = None
                   ) -> list[Path]:
    """Render each validation prompt with the adapters as trained so far into
    ``<run>/samples/step-<step>-<k>.mp4`` (main process; the others wait), and log base | LoRA
    side by side to TensorBoard as ``samples/base_vs_lora_<k>``. The base render (adapters
    disabled on every trained transformer) is made once per prompt into ``samples/base-<k>.mp4``
    and kept in ``base_samples``. i2v runs condition on ``validation.images``, or on the first
    frame of the training clips; continuation runs on the first frames of the training clips.
    Each model is on the device only while it runs, and every module is back where it was
    afterwards (finetune/memory/render.py); a model's sound goes into its mp4."""
    from finetune.inference import RenderArgs, render_with_audio  # inference code only when sampling
    from finetune.memory.render import idle_offloaded
    from finetune.video import write_video

    paths = []
    if accelerator.is_main_process:
        v, d = recipe.validation, recipe.data
        for t in transformers:
            t.eval()
        pipe = family.pipeline()
        pipe.set_progress_bar_config(disable=True)  # the training bar is the one to watch
        kind = family.task_input(family.task)
        inputs = validation_inputs(recipe, family) if kind else []
        with idle_offloaded(family, pipe, accelerator.device):
            for k, prompt in enumerate(v.prompts):
                args = RenderArgs(prompt=prompt, frames=d.frames, height=d.height, width=d.width, fps=recipe.fps,
                                  steps=v.steps, guidance=v.guidance, seed=v.seed,
                                  **({kind: inputs[k % len(inputs)]} if inputs else {}))
                out = Path(recipe.output.dir) / "samples" / f"step-{step:08d}-{k}.mp4"
                with torch.no_grad(), accelerator.autocast():
                    lora, sound = render_with_audio(family, pipe, args)
                    if base_samples is not None and k not in base_samples:
                        with adapters_disabled([accelerator.unwrap_model(t) for t in transformers]):
                            base_samples[k], base_sound = render_with_audio(family, pipe, args)
                        write_video(base_samples[k], out.with_name(f"base-{k}.mp4"), args.fps, audio=base_sound)
                paths.append(write_video(lora, out, args.fps, audio=sound))
                if base_samples is not None:
                    log_video(accelerator, f"samples/base_vs_lora_{k}", side_by_side(base_samples[k], lora), step,
                              args.fps)
        for t in transformers:
            t.train()
    accelerator.wait_for_everyone()
    return paths


@contextmanager
def adapters_disabled(models: list):
    """Run the base model: every adapter of ``models`` (the trained transformers) off, then on again."""
    for m in models:
        m.disable_adapters()
    try:
        yield
    finally:
        for m in models:
            m.enable_adapters()


def log_video(accelerator: Accelerator, tag: str, frames: torch.Tensor, step: int, fps: float) -> None:
    """``frames`` [F, H, W, 3] in [0, 1] to TensorBoard as an animated GIF image summary, which
    TensorBoard plays as a video. Written with PIL because torch's ``add_video`` needs moviepy
    only to make that GIF, a dependency for nothing else."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    arr = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in arr]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    image = Summary.Image(height=arr.shape[1], width=arr.shape[2], colorspace=3, encoded_image_string=buf.getvalue())
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)  # add_video's path


def validation_loss(accelerator: Accelerator, family: Family, models: list, experts: list[Expert],
                    dataset: CachedDataset, recipe: Recipe) -> float:
    """Denoising loss on the held-out clips at fixed noise and timesteps: ``fixed_timestep_loss``
    of each clip (batch of one, so clips of any bucket size mix), each trained expert over its
    share of the noise levels, averaged. ``models``: the unwrapped transformers, ``experts``' order."""
    losses = []
    for model, expert in zip(models, experts):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        for i in range(len(dataset)):
            batch = {k: v.to(device) for k, v in collate([dataset[i]]).items()}
            with accelerator.autocast():
                losses.append(fixed_timestep_loss(family, model, batch, recipe.fps, expert=expert, recipe=recipe))
        model.train(was_training)
    return sum(losses) / len(losses)


def log_validation_loss(accelerator: Accelerator, family: Family, transformers: list, experts: list[Expert],
                        dataset: CachedDataset, recipe: Recipe, step: int) -> float | None:
    """Compute ``val_loss`` on the main process and log it at ``step``; the others wait."""
    value = None
    if accelerator.is_main_process:
        value = validation_loss(accelerator, family, [accelerator.unwrap_model(t) for t in transformers], experts,
                                dataset, recipe)
        accelerator.log({"val_loss": value}, step=step)
    accelerator.wait_for_everyone()
    return value


def validation_inputs(recipe: Recipe, family: Family, clips: list[Clip] | None = None) -> list:
    """What each validation render of the family's task conditions on: images for i2v (see
    :func:`validation_images`); for video-conditioned tasks (continue) the first
    ``family.cond_frames`` frames of each of ``clips``, as lists of PIL images. ``clips``: the
    training clips to start from, by default the first of the manifest (or data.dataset), one per validation prompt
    (publish passes those its previews' captions came from)."""
    if clips is None and not (family.task_input(family.task) == "image" and recipe.validation.images):
        clips = load_clips(recipe.data.manifest, recipe.data.dataset, recipe.data.trigger)[:len(recipe.validation.prompts)]
    if family.task_input(family.task) == "image":
        return validation_images(recipe, clips or [])
    from finetune.video import pil_frames, read_clip

    d = recipe.data
    return [pil_frames(read_clip(c.path, family.cond_frames, recipe.fps, d.height, d.width)) for c in clips]


def validation_images(recipe: Recipe, clips: list[Clip]) -> list:
    """Conditioning images for i2v samples: ``validation.images``, else the first frame of each
    of ``clips`` (as PIL images)."""
    from PIL import Image

    from finetune.video import first_frame

    if recipe.validation.images:
        return [Image.open(p).convert("RGB") for p in recipe.validation.images]
    return [first_frame(c.path) for c in clips]


def first_bad_gradient(params: list[torch.nn.Parameter], names: dict[int, str]) -> str:
    """The name of the first parameter whose gradient has a NaN or infinity ("none" if all are finite)."""
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return names.get(id(p), "an unnamed parameter")
    return "none"


def check_bad_steps(bad_in_row: int, step: int, loss: float, params: list[torch.nn.Parameter],
                    names: dict[int, str], o, run_dir: Path, accelerator: Accelerator) -> None:
    """A step with a non-finite loss or gradient norm was skipped: warn, naming the step and the first
    parameter with a non-finite gradient; raise TrainingDiverged once ``optim.max_bad_steps`` came
    in a row (nothing is saved then; the last checkpoint stays as it was)."""
    where = first_bad_gradient(params, names)
    what = f"loss is {loss}" if not math.isfinite(loss) else f"the gradient of {where} is not finite"
    if bad_in_row < o.max_bad_steps:
        accelerator.print(f"warning: step {step + 1} skipped: {what} (first non-finite gradient: {where}); "
                          f"{bad_in_row} of optim.max_bad_steps={o.max_bad_steps} in a row")
        return
    last = ckpt.list_checkpoints(run_dir)
    raise TrainingDiverged(
        f"{what} at step {step + 1}: {bad_in_row} bad steps in a row (optim.max_bad_steps={o.max_bad_steps}); "
        f"stopped without saving. Last good checkpoint: {last[-1] if last else 'none'} (untouched). "
        f"Lower optim.lr (now {o.lr:g}) or keep optim.max_grad_norm > 0, then --resume latest."
    )


def _clip(accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0

