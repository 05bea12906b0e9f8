"""Does the training step fit the card, and does the planner know? For chosen families at full size
with random weights (nothing downloaded): the measured CUDA peak of a LoRA training step
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``), seconds per step, the memory
planner's prediction for the same recipe and the measured/predicted ratio; the card-budget setting
(16 GB, 8 GB for LTX-Video) against the unconstrained bf16 step, the named baseline, in the same
run (s/step ratio); and the model FLOPs utilisation of the unconstrained step.

    python bench/memory.py                         # every case below, on a CUDA GPU
    python bench/memory.py --cases wan-14b ltx-2b  # some of them
    python bench/memory.py --tiny                  # the tiny test models on a CPU (a smoke run)

Each case is a recipe built through the normal recipe machinery (config validation, the planner's
``choose_overrides`` for the budget, ``check_implemented``), so the budget setting is exactly what
``train_lora.py --plan --vram N`` chooses, applied the way the trainer applies it (block swap and
activation offload through ``finetune.memory.runtime.apply``). A setting the trainer does not run
gives a skip line in the table, as does one this bench does not apply itself (:data:`APPLIED`).

The configurations:
  unconstrained  the recipe's bf16 weights, no quantisation, AdamW, gradient checkpointing on,
                 nothing offloaded: the baseline
  budget         the planner's cheapest overrides that fit ``budget_gb`` (fp8 weights, AdamW8bit,
                 ...), run with the card limited to that many GiB
                 (``torch.cuda.set_per_process_memory_fraction``), so a step that does not fit
                 fails as out of memory instead of borrowing the rest of the card

How a step is measured: the family's transformer(s) are built from the family's
``full_size_configs`` directly on the GPU with the class's own random init in float32, then cast to
bf16 tensor by tensor, keeping what ``from_pretrained`` keeps in float32 (building on the meta device
and materialising with ``to_empty`` would leave computed buffers, such as rotary tables,
uninitialised; the float32 build caps a case at about 18B parameters on an 80 GB card), quantised
as the recipe says, given the trainer's LoRA
(``trainer.add_lora``) and optimizer (``trainer.make_optimizer``); the inputs are random tensors of
the shapes the planner traces (``Family.planning_inputs``); the step is ``trainer.denoising_loss``
under bf16 autocast, backward, gradient clipping, optimizer step. Peaks are reset after building, so
they cover the steps (one warm-up plus ``--steps``), not the load. The planner's training-phase peak
includes a fixed runtime overhead (CUDA context, allocator slack) that ``max_memory_allocated`` does
not see: the ratio compares the allocated peak with the prediction without that item.

Model FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of the
unconstrained step, less one counted forward when gradient checkpointing recomputes it (model FLOPs,
not hardware FLOPs: recomputation does not count as work done). MFU = model FLOPs / s/step / the
GPU's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``).

Each configuration of the GPU mode runs in its own process, so peaks are its own; ``--tiny`` runs in
one process on a CPU and measures no memory (there is no CUDA allocator), only that everything
runs. Prints a table; writes every number to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2 ** 30


@dataclass(frozen=True)
class Case:
    """One benchmark case: a family's checkpoint at a clip size, with the card budget it targets.
    ``checkpoint`` None: the tiny test model (``--tiny``)."""

    family: str
    task: str
    checkpoint: str | None
    frames: int
    height: int
    width: int
    rank: int
    budget_gb: float


# The targets of issue 8: Wan 2.1 14B 832x480x81 r32 and HunyuanVideo-1.5 480p x121 r32 in 16 GB,
# LTX-Video 2B 768x512x121 in 8 GB.
CASES = {
    "wan-14b": Case("wan", "t2v", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 81, 480, 832, 32, 16),
    "hunyuanvideo15-480p": Case("hunyuanvideo15", "t2v", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
                                121, 480, 848, 32, 16),
    "ltx-2b": Case("ltx", "t2v", "Lightricks/LTX-Video", 121, 512, 768, 32, 8),
}
# --tiny: the tiny registry models at their tiny recipes' sizes (recipes/tiny/<family>.yaml)
TINY_CASES = {
    "wan": Case("wan", "t2v", None, 9, 32, 32, 8, 16),
    "ltx": Case("ltx", "t2v", None, 9, 64, 64, 8, 8),
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched
# against torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("RTX 4090", 165.0), ("RTX 3090", 71.0)]
# Recipe settings this bench applies to the step it builds. A budget override outside this set is
# reported as a skip, never silently ignored.
APPLIED = {"model.quantization", "optim.optimizer", "memory.gradient_checkpointing", "memory.text_encoder",
           "memory.vae_tiling", "memory.offload_idle_expert", "memory.blocks_to_swap", "memory.activation_offload",
           "data.frames"}
CONFIGS = ("unconstrained", "budget")


# ---------------------------------------------------------------------------- recipes


def base_recipe(case: Case):
    """The unconstrained recipe of ``case`` (module docstring), validated."""
    from finetune.config import load_recipe, recipe_from_dict

    if case.checkpoint is None:
        path = ROOT / "recipes" / "tiny" / f"{case.family}.yaml"
        overrides = [f"data.frames={case.frames}", f"data.height={case.height}", f"data.width={case.width}",
                     f"lora.rank={case.rank}", f"lora.alpha={case.rank}", "memory.gradient_checkpointing=true"]
        return load_recipe(path, overrides)
    return recipe_from_dict({"model": {"family": case.family, "pretrained": case.checkpoint, "task": case.task,
                                       "dtype": "bf16", "quantization": "none"},
                             "data": {"frames": case.frames, "height": case.height, "width": case.width},
                             "lora": {"rank": case.rank, "alpha": case.rank}, "optim": {"optimizer": "adamw"},
                             "memory": {"gradient_checkpointing": True}}, source=f"bench case {case.family}")


def config_recipe(case: Case, config: str) -> tuple[Any, dict[str, Any], str]:
    """(recipe, overrides, skip reason or "") of ``config`` for ``case``. The budget of a real
    checkpoint is the planner's choice; tiny models are not planned, so their budget run stands in
    with fp8 weights, which exercises the same code path."""
    from finetune.errors import UserError
    from finetune.memory.planner import apply_overrides, check_implemented, choose_overrides

    recipe = base_recipe(case)
    if config == "unconstrained":
        return recipe, {}, ""
    try:
        overrides = {"model.quantization": "fp8"} if case.checkpoint is None else \
            choose_overrides(recipe, case.budget_gb).overrides
        budget = apply_overrides(recipe, overrides)
        check_implemented(budget)
    except UserError as e:  # DoesNotFit, NotImplementedYet: a skip line, not a crash
        return recipe, locals().get("overrides", {}), f"{type(e).__name__}: {e}"
    unapplied = sorted(k for k in overrides if k not in APPLIED)
    if unapplied:
        return budget, overrides, (f"{', '.join(unapplied)}: not applied by bench/memory.py yet (add it to "
                                   f"APPLIED with the code that applies it)")
    return budget, overrides, ""


# ---------------------------------------------------------------------------- building


def build_full_size(recipe, device):
    """The family with its transformer(s) at full size, random weights, on ``device`` (module
    docstring); encoders stay meta-device shells (the family reads their configs)."""
    import torch

    from finetune.families.base import ModelSpec
    from finetune.memory.architecture import keeps_fp32
    from finetune.memory.fp8 import quantize_fp8
    from finetune.memory.planner import checkpoint_parts
    from finetune.memory.trace import _meta_components

    fam, ckpt, parts = checkpoint_parts(recipe)
    dtype = torch.bfloat16
    built = {}
    for i, name in enumerate(n for n in ("transformer", "transformer_2") if n in parts):
        full = parts[name]
        torch.manual_seed(i)
        with torch.device(device):  # the class's own init, in float32, on the GPU
            model = full.cls.from_config(full.config)
        model.to(dtype)  # tensor by tensor: the peak is the float32 model
        for pname, p in model.named_parameters():
            if keeps_fp32(model, pname, dtype):  # as from_pretrained keeps them
                p.data = p.data.float()
        model.requires_grad_(False)
        model.eval()
        if recipe.model.quantization == "fp8":
            quantize_fp8(model, what=f"bench {fam.name} {name}")
        built[name] = model
    comps = _meta_components(fam, parts, built["transformer"])
    comps.transformer_2 = built.get("transformer_2")
    spec = ModelSpec(pretrained=ckpt, dtype=dtype, quantization=recipe.model.quantization, task=recipe.model.task)
    return fam(comps, spec)


def full_size_batch(family, recipe, device) -> dict:
    """Random inputs of the shapes the planner traces: latents [1, C, f, h, w] and the cond tensors."""
    import torch

    d = recipe.data
    latent, cond = family.planning_inputs(recipe.model.task, d.frames, d.height, d.width, family.max_sequence_length)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"latents": torch.randn(latent, generator=gen, device=device, dtype=torch.bfloat16)}
    for k, (shape, dt) in cond.items():
        batch[k] = (torch.randn(shape, generator=gen, device=device).to(dt) if dt.is_floating_point
                    else torch.ones(shape, device=device, dtype=dt))
    return batch


def tiny_family_and_batch(recipe, device):
    """The tiny model through the normal load path, and one clip encoded by its own encoders, as the
    cache would store it."""
    import torch

    from finetune import trainer

    family = recipe.family_cls().load(trainer.model_spec(recipe, device), device=device)
    d = recipe.data
    video = torch.rand(1, 3, d.frames, d.height, d.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = family.encode_videos(video.to(device), generator=torch.Generator().manual_seed(0))
        batch = {"latents": latents, **family.encode_prompts(["a square sliding over a gradient"]),
                 **family.encode_conditioning(video.to(device), latents)}
    family.release_encoders()
    return family, batch


# ---------------------------------------------------------------------------- one configuration


def run_config(case: Case, config: str, steps: int, count_flops: bool) -> dict[str, Any]:
    """Build ``config`` of ``case``, run warm-up + ``steps`` training steps, measure (module
    docstring). Returns a result dict; ``skipped`` holds the reason if it did not run."""
    import torch

    from finetune import trainer
    from finetune.memory import runtime as memory_runtime
    from finetune.memory.planner import RUNTIME_OVERHEAD, plan_recipe

    recipe, overrides, skip = config_recipe(case, config)
    out: dict[str, Any] = {"config": config, "overrides": overrides, "skipped": skip or None}
    if skip:
        return out
    cuda = torch.cuda.is_available() and case.checkpoint is not None
    device = torch.device("cuda" if cuda else "cpu")
    if case.checkpoint is None:
        family, batch = tiny_family_and_batch(recipe, device)
    else:
        family = build_full_size(recipe, device)
        batch = full_size_batch(family, recipe, device)
    expert = trainer.trained_experts(recipe, family)[0]
    transformer = getattr(family.components, expert.attr)
    params = trainer.add_lora(transformer, recipe)
    if recipe.memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    memory_runtime.apply(recipe.memory, {expert.attr: transformer}, device)  # block swap, activation offload
    transformer.train()
    if recipe.memory.offload_idle_expert:
        for e in family.experts():
            if e.attr != expert.attr:
                getattr(family.components, e.attr).to("cpu")
    optimizer = trainer.make_optimizer(params, recipe)
    shape = tuple(batch["latents"].shape)

    def step(update: bool = True) -> None:
        gen = torch.Generator().manual_seed(0)
        sigmas = trainer.sample_sigmas(recipe, family, shape, gen).to(device)
        noise = torch.randn(shape, generator=gen).to(device, batch["latents"].dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = trainer.denoising_loss(family, transformer, batch, sigmas, noise, recipe.fps)
        loss.backward()
        if update:
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        if config == "budget":  # the card as small as the budget: a step that does not fit fails
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, case.budget_gb * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for _ in range(steps + 1):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        out["skipped"] = f"out of memory within {case.budget_gb:g} GiB" if config == "budget" else "out of memory"
        return out
    out["seconds_per_step"] = statistics.median(times[1:])
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB if cuda else None
    out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    if case.checkpoint is not None:
        predicted = next(p for p in plan_recipe(recipe).phases if p.name == "training").peak
        out["predicted_gib"] = predicted / GIB
        out["predicted_allocated_gib"] = (predicted - RUNTIME_OVERHEAD) / GIB
        if out["peak_allocated_gib"] is not None:
            out["measured_over_predicted"] = out["peak_allocated_gib"] / out["predicted_allocated_gib"]
    if count_flops:
        out["model_flops"] = model_flops(transformer, step, recipe.memory.gradient_checkpointing, family, batch,
                                         recipe, device, cuda)
    return out


def model_flops(transformer, step, checkpointing: bool, family, batch, recipe, device, cuda: bool) -> int:
    """FLOPs of one forward + backward (module docstring), recomputation left out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from finetune import trainer

    with FlopCounterMode(display=False) as counter:
        step(update=False)
    total = counter.get_total_flops()
    if checkpointing:  # the recompute is one more forward: count one and take it off
        shape = tuple(batch["latents"].shape)
        gen = torch.Generator().manual_seed(0)
        sigmas = trainer.sample_sigmas(recipe, family, shape, gen).to(device)
        noise = torch.randn(shape, generator=gen).to(device, batch["latents"].dtype)
        with FlopCounterMode(display=False) as forward, torch.no_grad(), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            trainer.denoising_loss(family, transformer, batch, sigmas, noise, recipe.fps)
        total -= forward.get_total_flops()
    return int(total)


# ---------------------------------------------------------------------------- the run


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    return next((t for name, t in PEAK_BF16_TFLOPS if name in device), None)


def run_child(name: str, config: str, args) -> dict[str, Any]:
    """One configuration in its own process (its own CUDA peak); a crash becomes a skip line."""
    cmd = [sys.executable, __file__, "--one", f"{name}:{config}", "--steps", str(args.steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode or not lines:
        err = (res.stderr.strip().splitlines() or ["failed"])[-1]
        return {"config": config, "overrides": {}, "skipped": f"failed: {err}"}
    return json.loads(lines[-1])


def summarise(name: str, case: Case, results: dict[str, dict], tflops: float | None) -> dict[str, Any]:
    """Ratios and target checks of one case."""
    base, budget = results["unconstrained"], results["budget"]
    row: dict[str, Any] = {"case": name, **asdict(case), "results": results}
    if base.get("seconds_per_step") and budget.get("seconds_per_step"):
        row["budget_over_unconstrained_time"] = budget["seconds_per_step"] / base["seconds_per_step"]
    if base.get("model_flops") and base.get("seconds_per_step") and tflops:
        row["mfu"] = base["model_flops"] / base["seconds_per_step"] / (tflops * 1e12)
    checks = {}  # the issue's targets; tiny models have none
    if case.checkpoint is not None and budget.get("peak_reserved_gib") is not None:
        checks[f"budget peak <= {case.budget_gb:g} GiB"] = budget["peak_reserved_gib"] <= case.budget_gb
    if case.checkpoint is not None and "budget_over_unconstrained_time" in row:
        checks["budget s/step <= 1.3x unconstrained"] = row["budget_over_unconstrained_time"] <= 1.3
    for r in (base, budget):
        if r.get("measured_over_predicted") is not None:
            checks[f"{r['config']}: measured within 10% of predicted"] = abs(r["measured_over_predicted"] - 1) <= 0.10
    row["checks"] = checks
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict], tiny: bool) -> None:
    device = next((r["device"] for row in rows for r in row["results"].values() if r.get("device")), "?")
    note = " (--tiny: tiny models, no CUDA allocator, memory columns empty)" if tiny else ""
    print(f"bench/memory.py on {device}{note}")
    head = (f"{'case':<22}{'config':<26}{'s/step':>9}{'alloc GiB':>11}{'reserv GiB':>12}{'pred GiB':>10}"
            f"{'meas/pred':>11}{'vs base':>9}{'MFU':>7}")
    print(head)
    for row in rows:
        for config in CONFIGS:
            r = row["results"][config]
            label = config + (" (baseline)" if config == "unconstrained" else f" {row['budget_gb']:g}G")
            if r.get("skipped"):
                print(f"{row['case']:<22}{label:<26}skipped: {r['skipped']}")
                continue
            rel = row.get("budget_over_unconstrained_time") if config == "budget" else 1.0
            mfu = row.get("mfu") if config == "unconstrained" else None
            print(f"{row['case']:<22}{label:<26}{r['seconds_per_step']:>9.3f}"
                  f"{_fmt(r.get('peak_allocated_gib'), '.2f'):>11}{_fmt(r.get('peak_reserved_gib'), '.2f'):>12}"
                  f"{_fmt(r.get('predicted_allocated_gib'), '.2f'):>10}"
                  f"{_fmt(r.get('measured_over_predicted'), '.3f'):>11}{_fmt(rel, '.2f'):>9}"
                  f"{_fmt(mfu and 100 * mfu, '.1f'):>7}")
            if r.get("overrides"):
                print(f"{'':<22}{'':<26}settings: {', '.join(f'{k}={v}' for k, v in r['overrides'].items())}")
        for check, ok in row["checks"].items():
            print(f"{'':<22}check: {check}: {'pass' if ok else 'FAIL'}")
    print("alloc/reserv: torch.cuda.max_memory_allocated/reserved over the steps; pred: the planner's training "
          "peak without its runtime overhead; vs base: s/step over the unconstrained bf16 step; MFU (%): model "
          "FLOPs (torch.utils.flop_counter) / s/step / the GPU's dense bf16 peak")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny models on a CPU, in this process (a smoke run)")
    p.add_argument("--cases", nargs="+", help="case names (default: all of the mode's)")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up (median)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_memory.json"), help="where to write the results")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: NAME:CONFIG in this process, print JSON
    args = p.parse_args()
    cases = TINY_CASES if args.tiny else CASES
    if args.one is not None:
        name, config = args.one.split(":")
        print(json.dumps(run_config(CASES[name], config, args.steps, count_flops=config == "unconstrained")))
        return 0
    unknown = [c for c in args.cases or [] if c not in cases]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; {'--tiny ' if args.tiny else ''}cases: {', '.join(cases)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        p.error("the full-size cases need a CUDA GPU; run --tiny for the CPU smoke run")
    rows = []
    for name in args.cases or list(cases):
        case = cases[name]
        results = {c: (run_config(case, c, args.steps, count_flops=c == "unconstrained") if args.tiny
                       else run_child(name, c, args)) for c in CONFIGS}
        device = next((r["device"] for r in results.values() if r.get("device")), "cpu")
        rows.append(summarise(name, case, results, peak_tflops(device, args.peak_tflops)))
    print_table(rows, args.tiny)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tiny": args.tiny, "steps": args.steps, "cases": rows}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
