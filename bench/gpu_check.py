"""Does this studio work on my GPU? One command, at most ``--minutes`` (default 8) on one
H100-class GPU, that runs what a user runs and prints one table: ok, failed (with the error line)
or not run (for time).

    python bench/gpu_check.py            # everything below
    python bench/gpu_check.py --quick    # the tiny part alone (a few minutes)

1. Every registered family and task on its tiny model: data_prep cuts clips from the sample footage
   (tests/assets) at the tiny recipe's frames, size and frame rate; ``train_lora.py`` trains 3
   steps in bf16 on the GPU (with fp8 weights, one swapped block and activation offload on the
   families whose transformer takes fp8); ``infer.py`` renders with the adapter.
2. nf4 weights (bitsandbytes) on a saved tiny folder (``recipes/tiny/wan-demo.yaml``, the
   ``from_pretrained`` path) with AdamW8bit, then a render.
3. With the time left, the full-size cases of ``bench/memory.py`` (random full-size weights,
   train_lora.py at the card budget and unconstrained), each in its own process.

The tiny runs call the scripts' ``main`` in this process (one interpreter start, not 60); a
failure is caught, recorded with its last line and the check goes on. ``--cpu`` runs the tiny
part on the CPU instead (slow; it is how this script is tested without a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FOOTAGE = ROOT / "tests" / "assets" / "bigbuckbunny.mp4"
PROMPT = "mystyle, a rabbit in a meadow"


@dataclass
class Row:
    """One line of the table."""

    part: str
    case: str
    status: str = "not run (out of time)"
    seconds: float = 0.0
    detail: str = ""


class Skipped(Exception):
    """A case that cannot run here (nf4 without CUDA): its row says why, and it is no failure."""


def _error_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:240] if text else type(e).__name__


def timed(row: Row, fn) -> Row:
    """Run ``fn`` for ``row``: ok, or failed with the error's first line; its output is kept back
    (the table is what this prints) unless it failed."""
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            detail = fn()
        row.status, row.detail = "ok", detail or ""
    except Skipped as e:
        row.status, row.detail = "skipped", str(e)
    except SystemExit as e:  # argparse or run_main: a non-zero exit is a failure
        row.status = "ok" if not e.code else "failed"
        row.detail = "" if not e.code else f"exit {e.code}: {out.getvalue().strip().splitlines()[-1:] or ''}"
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; the check goes on
        row.status, row.detail = "failed", _error_line(e)
        traceback.print_exc(limit=3, file=sys.stderr)
    finally:
        row.seconds = time.perf_counter() - t0
        _free_gpu()
    return row


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _script_main(module: str):
    """``train_lora.main`` / ``infer.main``, raising on a non-zero return or a user error (the scripts'
    run_main prints and exits; here the exception itself is the row's error)."""
    import importlib

    main = importlib.import_module(module).main

    def call(argv: list[str]) -> None:
        code = main(argv)
        if code:
            raise RuntimeError(f"{module}.py exited {code}")

    return call


def tiny_cases(families: list[str] | None) -> list[tuple[str, str]]:
    from finetune.families import family_names, get_family

    names = families or family_names()
    return [(n, t) for n in names for t in get_family(n).tasks]


def recipe_path(family: str, task: str) -> Path:
    from finetune.families import get_family

    first = task == get_family(family).tasks[0]
    return ROOT / "recipes" / "tiny" / (f"{family}.yaml" if first else f"{family}-{task}.yaml")


def cut_clips(family: str, recipe: Path, work: Path) -> Path:
    """data_prep on the sample footage at ``recipe``'s frames, size and fps -> the manifest."""
    from data_prep import PrepOptions, prepare
    from finetune.config import load_recipe

    r = load_recipe(recipe)
    d = r.data
    dataset = work / f"clips-{family}-{d.frames}x{d.width}x{d.height}@{r.fps:g}"
    if not (dataset / "manifest.jsonl").is_file():
        opts = PrepOptions(family=family, frames=d.frames, fps=r.fps, size=f"{d.width}x{d.height}", buckets="fixed",
                           mode="uniform", clips_per_shot=1, trigger="mystyle", progress=False)
        prepare(FOOTAGE, dataset, opts)
    return dataset / "manifest.jsonl"


def tiny_case(family: str, task: str, work: Path, cpu: bool) -> str:
    """Cut clips, train 3 steps in bf16 (fp8 + block swap + offload where the family takes fp8), render."""
    from finetune.families import get_family

    cls = get_family(family)
    recipe = recipe_path(family, task)
    manifest = cut_clips(family, recipe, work)
    run = work / f"run-{family}-{task}"
    memory = ["model.quantization=fp8", "memory.blocks_to_swap=1", "memory.activation_offload=true"] \
        if cls.fp8_ok else []
    _script_main("train_lora")(["--recipe", str(recipe), f"data.manifest={manifest}", f"output.dir={run}",
                                "model.dtype=bf16", "optim.steps=3", "checkpoint.every=0", "validation.prompts=[]",
                                *memory])
    extra = []
    kind = cls.task_input(task)
    if kind == "image":
        from finetune.video import first_frame

        first = next(p for p in manifest.parent.glob("clips/*.mp4"))
        first_frame(first).save(work / f"first-{family}.png")
        extra = ["--image", str(work / f"first-{family}.png")]
    elif kind == "video":
        extra = ["--video", str(next(p for p in manifest.parent.glob("clips/*.mp4")))]
    out = work / f"render-{family}-{task}.mp4"
    _script_main("infer")(["--lora", str(run), "--prompt", PROMPT, "--steps", "2", "--dtype", "bf16",
                           "--out", str(out), *extra])
    return ("fp8 + swap + offload" if memory else "bf16") + f", {out.stat().st_size // 1024} KiB mp4"


def nf4_case(work: Path, cpu: bool) -> str:
    """nf4 weights on the saved tiny Wan folder (the from_pretrained path), AdamW8bit, then a render."""
    if cpu:
        raise Skipped("nf4 (bitsandbytes) needs a CUDA GPU")
    recipe = ROOT / "recipes" / "tiny" / "wan-demo.yaml"
    manifest = cut_clips("wan", recipe, work)
    run = work / "run-wan-nf4"
    _script_main("train_lora")(["--recipe", str(recipe), f"data.manifest={manifest}", f"output.dir={run}",
                                "model.quantization=nf4", "optim.optimizer=adamw8bit", "optim.steps=3",
                                "checkpoint.every=0", "validation.prompts=[]"])
    out = work / "render-wan-nf4.mp4"
    _script_main("infer")(["--lora", str(run), "--prompt", PROMPT, "--steps", "2", "--out", str(out)])
    return "nf4 + adamw8bit"


def full_size_rows(work: Path, deadline: float, args) -> list[Row]:
    """bench/memory.py's cases with the time left, one row per configuration."""
    import memory as bench

    rows = []
    bench_args = argparse.Namespace(steps=2, timeout=args.case_timeout, peak_tflops=None,
                                    json=str(work / "bench_memory.jsonl"))
    for name, case in bench.CASES.items():
        if deadline - time.monotonic() < 90:
            rows += [Row("full size", f"{name} {c}") for c in bench.CONFIGS]
            continue
        summary = bench.run_case(name, case, bench_args, work, deadline)
        for config, r in summary["results"].items():
            row = Row("full size", f"{name} {config}", seconds=r.get("wall_seconds", 0.0))
            if r.get("skipped"):
                row.status = "not run (out of time)" if "out of time" in r["skipped"] or "not finished" in r["skipped"] \
                    else ("skipped" if config == "budget" and case.budget_gb is None else "failed")
                row.detail = r["skipped"]
            else:
                row.status = "ok"
                row.detail = (f"{r['seconds_per_step']:.2f} s/step, reserved {r.get('peak_reserved_gib') or 0:.2f} GiB"
                              f" (planned {r.get('predicted_allocator_gib') or 0:.2f})"
                              + (f", MFU {100 * summary['mfu']:.1f}%" if config == "unconstrained" and summary.get("mfu")
                                 else ""))
            rows.append(row)
    return rows


def print_table(rows: list[Row], device: str, minutes: float) -> None:
    ok = sum(r.status == "ok" for r in rows)
    failed = sum(r.status == "failed" for r in rows)
    skipped = sum(r.status == "skipped" for r in rows)
    print(f"\ngpu_check on {device}: {ok} ok, {failed} failed, {skipped} skipped, "
          f"{len(rows) - ok - failed - skipped} not run, {minutes:.1f} min")
    width = max(len(r.case) for r in rows) + 2
    print(f"{'part':<11}{'case':<{width}}{'result':<24}{'s':>7}  detail")
    for r in rows:
        print(f"{r.part:<11}{r.case:<{width}}{r.status:<24}{r.seconds:>7.1f}  {r.detail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny part alone (1 and 2)")
    p.add_argument("--minutes", type=float, default=8.0, help="the whole check's time; what is left out says so")
    p.add_argument("--families", nargs="+", help="only these families (default: every registered one)")
    p.add_argument("--case-timeout", type=float, default=300, help="seconds one full-size configuration may take")
    p.add_argument("--cpu", action="store_true", help="run the tiny part on the CPU (slow; to test this script)")
    p.add_argument("--work", type=Path, help="folder for clips, runs and renders (default: a temporary one)")
    args = p.parse_args(argv)

    import os
    import tempfile

    if args.cpu:  # the scripts pick the CUDA device when there is one: hide it before torch looks
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA GPU here: this checks a GPU (--cpu runs the tiny part on the CPU, slowly)")
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        todo = [(Row("tiny", f"{f}:{t}"), lambda f=f, t=t: tiny_case(f, t, work, args.cpu))
                for f, t in tiny_cases(args.families)]
        todo.append((Row("tiny", "wan nf4 folder"), lambda: nf4_case(work, args.cpu)))
        for row, fn in todo:
            rows.append(timed(row, fn) if time.monotonic() < deadline else row)
            print(f"{row.part} {row.case}: {row.status} {row.detail}", file=sys.stderr)
        if not args.quick and not args.cpu:
            rows += full_size_rows(work, deadline, args)
    print_table(rows, device, (time.monotonic() - start) / 60)
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
