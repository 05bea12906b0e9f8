"""The memory planner over every shipped recipe, offline on a CPU.

    python bench/plan_recipes.py                       # every recipe x --vram 12 16 24: what --plan proposes
    python bench/plan_recipes.py --vram 16 --recipes recipes/wan/*.yaml
    python bench/plan_recipes.py --replan [--write]    # each 16/24 GB recipe at its model's native clip length
    python bench/plan_recipes.py --table               # the README's recipe table

Sweep: for each recipe and card, what ``train_lora.py --plan --vram N`` proposes, then the proposal
applied to the recipe and checked as the trainer checks it before loading (``check_implemented``,
``check_blocks_to_swap``) and planned again: it must fit with the margin. Prints one line each
(recipe, card, planned peak, overrides or "fits as is" / "does not fit: closest ...") and exits 1
if a proposal does not re-plan as fitting or would be refused.

Replan: each ``*_16gb`` / ``*_24gb`` recipe is planned from its model's native clip length
(``Family.native_frames``, or the recipe's own frames if longer) with full-precision frozen weights,
so the planner picks the cheapest settings that fit its card (fp8 weights, block swap, activation
offload before fewer frames); ``--write`` puts the result into the recipe file (frames, weights,
optimizer, memory settings; comments kept) and its description line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHANGED_KEYS = ("data.frames", "model.quantization", "optim.optimizer", "memory.text_encoder",
                "memory.gradient_checkpointing", "memory.blocks_to_swap", "memory.activation_offload")


def shipped(patterns: list[str] | None) -> list[Path]:
    if patterns:
        return [Path(p).resolve() for p in patterns]
    return sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "tiny")


def sweep(recipes: list[Path], cards: list[float]) -> int:
    from finetune.config import load_recipe
    from finetune.errors import UserError
    from finetune.memory import planner

    bad = 0
    print(f"{'recipe':<46}{'card':>6}{'peak GiB':>10}  proposal")
    for path in recipes:
        recipe = load_recipe(path)
        for vram in cards:
            try:
                plan = planner.choose_overrides(recipe, vram)
            except planner.DoesNotFit as e:
                print(f"{str(path.relative_to(ROOT)):<46}{vram:>6g}{'-':>10}  does not fit: {str(e).split('; ', 1)[-1]}")
                continue
            applied = planner.apply_overrides(recipe, plan.overrides)
            try:
                planner.check_implemented(applied)
                planner.check_blocks_to_swap(applied)
                again = planner.plan_recipe(applied, vram)
                ok = again.fits(vram)
            except UserError as e:
                ok, again = False, plan
                print(f"  refused: {e}")
            bad += not ok
            what = ", ".join(f"{k}={planner._fmt(v)}" for k, v in plan.overrides.items()) or "fits as is"
            print(f"{str(path.relative_to(ROOT)):<46}{vram:>6g}{again.peak / planner.GIB:>10.2f}  "
                  f"{'' if ok else 'NOT FITTING AGAIN: '}{what}")
    return 1 if bad else 0


def replanned(path: Path):
    """(recipe as it is, plan of the recipe at its model's native length, card GiB)."""
    from finetune.config import load_recipe
    from finetune.memory import planner

    m = re.search(r"_(\d+)gb\.yaml$", path.name)
    if not m:
        return None
    card = float(m.group(1))
    recipe = load_recipe(path)
    frames = max(recipe.data.frames, recipe.family_cls().native_frames or recipe.data.frames)
    # from full-precision weights where fp8 can take over; a family without fp8 keeps its int8/nf4
    quant = "none" if recipe.family_cls().fp8_ok else recipe.model.quantization
    start = planner.apply_overrides(recipe, {"data.frames": frames, "model.quantization": quant,
                                             "memory.blocks_to_swap": 0, "memory.activation_offload": False})
    plan = planner.choose_overrides(start, card)
    return recipe, planner.apply_overrides(start, plan.overrides), plan, card


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def memory_settings(r, long: bool = False) -> list[str]:
    """A recipe's memory choices in words: frozen weights, swapped blocks, offload, text encoder,
    optimizer, rank (``long``: as the recipes' description lines say them)."""
    weights = {"none": r.model.dtype if r.model.dtype != "auto" else "bf16", "fp8": "fp8", "nf4": "NF4",
               "int8": "int8"}[r.model.quantization]
    out = [weights + (" frozen transformer" if long else "")]
    if r.memory.blocks_to_swap:
        out.append(f"{r.memory.blocks_to_swap} blocks swapped" + (" to host memory" if long else ""))
    if r.memory.activation_offload:
        out.append("activation offload")
    if r.memory.text_encoder != "gpu":
        out.append(f"text encoder {r.memory.text_encoder}")
    adam8 = "8-bit AdamW" if long else "AdamW8bit"
    return out + [adam8 if r.optim.optimizer == "adamw8bit" else "AdamW", f"rank {r.lora.rank}"]


def write_recipe(path: Path, old, new, plan, card: float) -> None:
    """Put ``new``'s values of CHANGED_KEYS into ``path`` line by line (comments kept; missing keys
    added at the end of their section) and rewrite the description line's settings."""
    lines = path.read_text().splitlines()
    for key in CHANGED_KEYS:
        section, name = key.split(".")
        value = _key(new, key)
        if value == _key(old, key):
            continue
        start = lines.index(f"{section}:")
        end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
        for i in range(start + 1, end):
            if re.match(rf"\s+{name}:", lines[i]):
                comment = lines[i].split("#", 1)[1] if "#" in lines[i] else None
                lines[i] = f"  {name}: {_value(value)}" + (f"   #{comment}" if comment else "")
                break
        else:
            lines.insert(end, f"  {name}: {_value(value)}")
    head, _, _ = lines[1].partition(": ")
    settings = [*memory_settings(new, long=True), f"{new.data.frames} frames at {new.data.width}x{new.data.height}"]
    lines[1] = f"{head}: {', '.join(settings)} (planned peak {plan.peak / 2**30:.1f} GiB + margin, not measured)."
    path.write_text("\n".join(lines) + "\n")


def replan(recipes: list[Path], write: bool) -> int:
    from finetune.memory import planner

    print(f"{'recipe':<46}{'frames before':>14}{'peak before':>13}{'frames after':>13}{'peak after':>12}  settings")
    for path in recipes:
        got = replanned(path)
        if got is None:
            continue
        old, new, plan, card = got
        before = planner.plan_recipe(old, card)
        what = ", ".join(f"{k}={_value(v)}" for k in CHANGED_KEYS if (v := _key(new, k)) != _key(old, k))
        print(f"{str(path.relative_to(ROOT)):<46}{old.data.frames:>14}{before.peak / 2**30:>13.2f}"
              f"{new.data.frames:>13}{plan.peak / 2**30:>12.2f}  {what or 'unchanged'}")
        if write:
            write_recipe(path, old, new, plan, card)
    return 0


def _key(recipe, key: str):
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def table(recipes: list[Path]) -> int:
    """The README's recipe table: each recipe's model, card, clip, memory settings and planned peak."""
    from finetune.config import load_recipe
    from finetune.memory import planner

    print("| recipe | model | card | clip | memory settings | planned peak GiB |")
    print("|---|---|---|---|---|---|")
    for path in recipes:
        m = re.search(r"_(\d+)gb\.yaml$", path.name)
        if not m:
            continue
        r = load_recipe(path)
        plan = planner.plan_recipe(r, float(m.group(1)))
        model = path.read_text().splitlines()[1].lstrip("# ").split(" on a ")[0]
        parts = memory_settings(r)
        print(f"| `{path.relative_to(ROOT)}` | {model} | {m.group(1)} GB | {r.data.frames} f, {r.data.width}x"
              f"{r.data.height}, {r.fps:g} fps | {', '.join(parts)} | {plan.peak / 2**30:.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vram", type=float, nargs="+", default=[12, 16, 24], help="card sizes in GiB")
    p.add_argument("--recipes", nargs="+", help="recipe files (default: every shipped one)")
    p.add_argument("--replan", action="store_true", help="re-plan each 16/24 GB recipe at its native clip length")
    p.add_argument("--write", action="store_true", help="with --replan: rewrite the recipe files")
    p.add_argument("--table", action="store_true", help="print the README's recipe table (markdown)")
    args = p.parse_args(argv)
    recipes = shipped(args.recipes)
    if args.table:
        return table(recipes)
    return replan(recipes, args.write) if args.replan else sweep(recipes, args.vram)


if __name__ == "__main__":
    sys.exit(main())
