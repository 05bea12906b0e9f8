"""Does the training step fit the card, and does the planner know? ``train_lora.py`` itself, run on
full-size models with random weights (``model.weights=random``: every component built from its
released config and loaded tensor by tensor as real weights load, nothing downloaded), for chosen
families and clip sizes: the measured CUDA peaks of its training steps (allocated and reserved,
from the run's ``metrics.jsonl``), seconds per step, the planner's prediction for the same recipe
and the measured/predicted ratio; the card-budget setting (16 GB, 8 GB for LTX-Video) against the
unconstrained bf16 step, the named baseline, in the same run; and the model FLOPs utilisation.

    python bench/memory.py                          # every case below, on a CUDA GPU
    python bench/memory.py --cases wan-14b ltx-2b   # some of them
    python bench/memory.py --tiny                   # the tiny test models on a CPU (a smoke run)

The configurations:
  unconstrained  the case's bf16 weights, no quantisation, AdamW, gradient checkpointing on,
                 nothing offloaded: the baseline
  budget         what ``train_lora.py --plan --vram N`` proposes for the case's card (the planner's
                 ``choose_overrides``), run with the card limited to N GiB (``--limit-vram N``:
                 ``torch.cuda.set_per_process_memory_fraction`` on the run's device index), so a
                 step that does not fit fails as out of memory instead of borrowing the rest

How a configuration runs: the case's recipe (with the overrides, ``model.weights=random``,
``optim.steps`` = one warm-up + ``--steps``, no checkpoints or renders) is written beside a
one-clip manifest of the case's frames and size, and ``train_lora.py`` runs on it in its own
process with a time cap (``--timeout``), so its peaks are its own and a crash, an out-of-memory
error or a hang costs only that row. Each finished row is appended to ``--json`` (JSON lines)
before the next starts. Seconds per step: the median over the steps after the warm-up. Peaks:
``max_memory_allocated``/``max_memory_reserved`` since training began (the trainer resets them
after caching). The planner's training-phase peak includes a fixed runtime overhead (CUDA context,
cuBLAS workspace) that the allocator does not see: the ratio compares the reserved peak with the
prediction less that item.

Model FLOPs: the planner's trace of the same step (fake/meta tensors, nothing kept alive) counts
them with torch's own formulas; recomputation under gradient checkpointing is left out. MFU = model
FLOPs / s/step / the GPU's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
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
    ``checkpoint`` None: the tiny test model (``--tiny``); ``budget_gb`` None: unconstrained only."""

    family: str
    task: str
    checkpoint: str | None
    frames: int
    height: int
    width: int
    rank: int
    budget_gb: float | None


# The targets: Wan 2.1 14B 832x480x81 r32 and HunyuanVideo-1.5 480p x121 r32 in 16 GB, LTX-Video 2B
# 768x512x121 in 8 GB; Wan 2.1 1.3B 832x480x81 unconstrained (the anchors quote ~16 GB, 8.3 s/step
# on an A100).
CASES = {
    "wan-14b": Case("wan", "t2v", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 81, 480, 832, 32, 16),
    "hunyuanvideo15-480p": Case("hunyuanvideo15", "t2v", "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
                                121, 480, 848, 32, 16),
    "ltx-2b": Case("ltx", "t2v", "Lightricks/LTX-Video", 121, 512, 768, 32, 8),
    "wan-1.3b": Case("wan", "t2v", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 81, 480, 832, 32, None),
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
                                       "dtype": "bf16", "quantization": "none", "weights": "random"},
                             "data": {"frames": case.frames, "height": case.height, "width": case.width},
                             "lora": {"rank": case.rank, "alpha": case.rank}, "optim": {"optimizer": "adamw"},
                             "memory": {"gradient_checkpointing": True}}, source=f"bench case {case.family}")


def config_recipe(case: Case, config: str) -> tuple[Any, dict[str, Any], str]:
    """(recipe, overrides, skip reason or "") of ``config`` for ``case``. The budget of a real
    checkpoint is the planner's choice (which proposes only what the trainer runs); tiny models are
    not planned, so their budget run stands in with fp8 weights, block swap and activation offload,
    which exercises the same code."""
    from finetune.errors import UserError
    from finetune.memory.planner import apply_overrides, check_implemented, choose_overrides

    recipe = base_recipe(case)
    if config == "unconstrained":
        return recipe, {}, ""
    if case.budget_gb is None:
        return recipe, {}, "no card budget for this case (the unconstrained step is the measurement)"
    try:
        overrides = ({"model.quantization": "fp8", "memory.blocks_to_swap": 1, "memory.activation_offload": True}
                     if case.checkpoint is None else choose_overrides(recipe, case.budget_gb).overrides)
        budget = apply_overrides(recipe, overrides)
        check_implemented(budget)
    except UserError as e:  # DoesNotFit: a skip line, not a crash
        return recipe, locals().get("overrides", {}), f"{type(e).__name__}: {e}"
    return budget, overrides, ""


def predicted(recipe) -> dict[str, Any]:
    """The planner's training-phase peak of ``recipe`` (with and without its runtime overhead) and
    the traced model FLOPs of its step."""
    from finetune.memory.planner import RUNTIME_OVERHEAD, plan_recipe

    plan = plan_recipe(recipe)
    train = next(p for p in plan.phases if p.name == "training").peak
    return {"predicted_gib": train / GIB, "predicted_allocator_gib": (train - RUNTIME_OVERHEAD) / GIB,
            "model_flops": plan.model_flops, "host_gib": plan.host_bytes / GIB}


# ---------------------------------------------------------------------------- one configuration


def write_clip(folder: Path, case: Case, fps: float) -> Path:
    """One synthetic clip of the case's frames and size (a square moving over a gradient) and its
    manifest; returns the manifest path."""
    import numpy as np

    from finetune.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    x = np.linspace(0, 255, case.width, dtype=np.float32)[None, :, None]
    frames = np.empty((case.frames, case.height, case.width, 3), np.uint8)
    side = min(case.height, case.width) // 3
    for t in range(case.frames):
        img = np.broadcast_to(x * np.array([0.9, 0.5, 0.2]), (case.height, case.width, 3)).copy()
        y0, x0 = (t * 3) % (case.height - side), (t * 5) % (case.width - side)
        img[y0:y0 + side, x0:x0 + side] = (30, 200, 90)
        frames[t] = img.astype(np.uint8)
    write_video(frames, folder / "clip.mp4", fps)
    row = {"path": "clip.mp4", "caption": "a green square sliding over an orange gradient", "frames": case.frames,
           "fps": fps, "width": case.width, "height": case.height}
    manifest.write_text(json.dumps(row) + "\n")
    return manifest


def run_config(name: str, case: Case, config: str, steps: int, timeout: float, work: Path,
               device: str | None = None) -> dict[str, Any]:
    """Run ``train_lora.py`` for ``config`` of ``case`` in its own process (module docstring) and
    read what it measured. Returns the row; ``skipped`` holds why it has no figures."""
    recipe, overrides, skip = config_recipe(case, config)
    row: dict[str, Any] = {"case": name, "config": config, "overrides": overrides, "skipped": skip or None}
    if skip:
        return row
    if case.checkpoint is not None:
        row.update(predicted(recipe))
    run = work / f"{name}-{config}"
    manifest = write_clip(work / f"{name}-clip", case, recipe.fps)
    recipe_file = work / f"{name}-{config}.yaml"
    recipe_file.write_text(recipe.to_yaml())
    cmd = [sys.executable, str(ROOT / "train_lora.py"), "--recipe", str(recipe_file), f"data.manifest={manifest}",
           f"output.dir={run}", f"optim.steps={steps + 1}", "checkpoint.every=0", "validation.prompts=[]"]
    if config == "budget" and case.checkpoint is not None:
        cmd += ["--limit-vram", str(case.budget_gb)]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": device} if device else {})}
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        row["skipped"] = f"not finished in {timeout:.0f} s (--timeout)"
        return row
    row["wall_seconds"] = time.perf_counter() - t0
    if res.returncode:
        row["skipped"] = "failed: " + _last_error(res.stderr)
        return row
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [m["seconds"] for m in metrics[1:]] or [metrics[-1]["seconds"]]
    row["seconds_per_step"] = statistics.median(times)
    row["loss"] = metrics[-1]["loss"]
    row["peak_allocated_gib"] = max((m.get("peak_allocated_gib") for m in metrics), default=None, key=lambda v: v or 0)
    row["peak_reserved_gib"] = max((m.get("peak_reserved_gib") for m in metrics), default=None, key=lambda v: v or 0)
    row["pinned_gib"] = metrics[-1].get("pinned_gib")
    row["device"] = _device_line(res.stdout)
    if row.get("peak_reserved_gib") and row.get("predicted_allocator_gib"):
        row["measured_over_predicted"] = row["peak_reserved_gib"] / row["predicted_allocator_gib"]
    return row


def _last_error(stderr: str) -> str:
    """The line that says what went wrong: an ``error:`` line of ours, else the last exception line."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:")]
    if ours:
        return ours[-1][len("error:"):].strip()
    exc = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return (exc or lines or ["no output"])[-1][:300]


def _device_line(stdout: str) -> str:
    """The device the trainer names on its first line (``training on 1 process (cuda, bf16)``)."""
    for line in stdout.splitlines():
        if line.startswith("training on "):
            return line.split("(", 1)[-1].rstrip(")")
    return "?"


# ---------------------------------------------------------------------------- the run


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    return next((t for name, t in PEAK_BF16_TFLOPS if name in device), None)


def summarise(name: str, case: Case, results: dict[str, dict], tflops: float | None) -> dict[str, Any]:
    """Ratios and target checks of one case."""
    base, budget = results["unconstrained"], results["budget"]
    row: dict[str, Any] = {"case": name, **asdict(case), "results": results}
    if base.get("seconds_per_step") and budget.get("seconds_per_step"):
        row["budget_over_unconstrained_time"] = budget["seconds_per_step"] / base["seconds_per_step"]
    if base.get("model_flops") and base.get("seconds_per_step") and tflops:
        row["mfu"] = base["model_flops"] / base["seconds_per_step"] / (tflops * 1e12)
    checks = {}  # the issues' targets; tiny models have none
    if case.checkpoint is not None and case.budget_gb and budget.get("peak_reserved_gib") is not None:
        target = 15.5 if case.budget_gb == 16 else case.budget_gb
        checks[f"budget peak reserved <= {target:g} GiB"] = budget["peak_reserved_gib"] <= target
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
    print(f"{'case':<22}{'config':<26}{'s/step':>9}{'alloc GiB':>11}{'reserv GiB':>12}{'pred GiB':>10}"
          f"{'meas/pred':>11}{'vs base':>9}{'MFU %':>7}")
    for row in rows:
        for config in CONFIGS:
            r = row["results"][config]
            label = config + (" (baseline)" if config == "unconstrained" else f" {row['budget_gb'] or 0:g}G")
            if r.get("skipped"):
                print(f"{row['case']:<22}{label:<26}skipped: {r['skipped']}")
                continue
            rel = row.get("budget_over_unconstrained_time") if config == "budget" else 1.0
            mfu = row.get("mfu") if config == "unconstrained" else None
            print(f"{row['case']:<22}{label:<26}{r['seconds_per_step']:>9.3f}"
                  f"{_fmt(r.get('peak_allocated_gib'), '.2f'):>11}{_fmt(r.get('peak_reserved_gib'), '.2f'):>12}"
                  f"{_fmt(r.get('predicted_allocator_gib'), '.2f'):>10}"
                  f"{_fmt(r.get('measured_over_predicted'), '.3f'):>11}{_fmt(rel, '.2f'):>9}"
                  f"{_fmt(mfu and 100 * mfu, '.1f'):>7}")
            if r.get("overrides"):
                print(f"{'':<22}{'':<26}settings: {', '.join(f'{k}={v}' for k, v in r['overrides'].items())}")
        for check, ok in row["checks"].items():
            print(f"{'':<22}check: {check}: {'pass' if ok else 'FAIL'}")
    print("alloc/reserv: torch.cuda.max_memory_allocated/reserved over the training steps of train_lora.py; pred: the "
          "planner's training peak less its runtime overhead; meas/pred: reserved over pred; vs base: s/step over "
          "the unconstrained bf16 step; MFU: traced model FLOPs / s/step / the GPU's dense bf16 peak")


def run_case(name: str, case: Case, args, work: Path, deadline: float) -> dict[str, Any]:
    """Both configurations of ``case``, each row appended to ``args.json`` as it finishes; a
    configuration with less than a minute left before ``deadline`` is a skip line."""
    results = {}
    for config in CONFIGS:
        left = deadline - time.monotonic()
        if left < 60:
            results[config] = {"case": name, "config": config, "overrides": {},
                               "skipped": "not run: out of time (--minutes)"}
        else:
            results[config] = run_config(name, case, config, args.steps, min(args.timeout, left), work)
        with open(args.json, "a") as f:
            f.write(json.dumps(results[config], default=str) + "\n")
    device = next((r["device"] for r in results.values() if r.get("device")), "cpu")
    return summarise(name, case, results, peak_tflops(device, args.peak_tflops))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny models on a CPU (a smoke run of this script)")
    p.add_argument("--cases", nargs="+", help="case names (default: all of the mode's)")
    p.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up (median)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one configuration may take")
    p.add_argument("--minutes", type=float, default=60, help="the whole run's time; configurations past it are skips")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_memory.jsonl"),
                   help="results, one JSON line per configuration, appended as each finishes")
    p.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    cases = TINY_CASES if args.tiny else CASES
    unknown = [c for c in args.cases or [] if c not in cases]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; {'--tiny ' if args.tiny else ''}cases: {', '.join(cases)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        p.error("the full-size cases need a CUDA GPU; run --tiny for the CPU smoke run")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = [run_case(name, cases[name], args, work, deadline) for name in args.cases or list(cases)]
    print_table(rows, args.tiny)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
