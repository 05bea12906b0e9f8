"""The embedded demo (``make demo``): the whole product on the sample videos, offline, on a CPU.

1. data_prep: split the sample footage at its shot cuts, cut clips at the family's frame rule,
   caption them with the trigger word, write the manifest and the review sheet;
2. train a LoRA on a tiny random Wan (the real diffusers classes, random weights);
3. render the same prompt and seed with and without the LoRA.

A tiny random model renders noise either way: the demo shows the machinery end to end, not a
style. The same steps with a real recipe are in the README.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
FOOTAGE = ("synth_lavfi.mp4", "bigbuckbunny.mp4", "oa4_launch.webm")
PROMPT = "mystyle, a red square sliding over a gradient"


def prepare_clips(out: Path, family: str, frames: int, size: int, fps: float):
    from data_prep import PrepOptions, prepare

    footage = out / "footage"
    footage.mkdir(parents=True, exist_ok=True)
    for name in FOOTAGE:
        if not (footage / name).exists():
            shutil.copy2(ASSETS / name, footage / name)
    opts = PrepOptions(family=family, frames=frames, fps=fps, size=f"{size}x{size}", buckets="fixed",
                       mode="uniform", clips_per_shot=2, trigger="mystyle")
    summary = prepare(footage, out / "dataset", opts)
    print(summary.text())
    return out / "dataset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--family", default="wan", choices=["wan", "ltx"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    from finetune.config import load_recipe

    recipe_path = ROOT / "recipes" / "tiny" / f"{args.family}.yaml"
    size = 64
    base = load_recipe(recipe_path, [f"data.height={size}", f"data.width={size}"])
    print(f"== 1/3 data_prep: {', '.join(FOOTAGE)} -> clips of {base.data.frames} frames at {base.fps:g} fps")
    dataset = prepare_clips(args.out, args.family, base.data.frames, size, base.fps)

    print(f"== 2/3 train: {recipe_path.relative_to(ROOT)}, {args.steps} steps")
    recipe = load_recipe(recipe_path, [f"data.height={size}", f"data.width={size}",
                                       f"data.manifest={dataset / 'manifest.jsonl'}", f"output.dir={args.out / 'run'}",
                                       f"optim.steps={args.steps}", "optim.lr=2e-3", "checkpoint.every=50"])
    if (args.out / "run").exists():
        shutil.rmtree(args.out / "run")  # a demo run starts fresh; real runs resume with --resume latest
    from finetune.trainer import train

    result = train(recipe)
    print_learning(result, recipe)

    print("== 3/3 render the same prompt and seed without and with the LoRA")
    videos = render_pair(result.run_dir, args.out)

    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s")
    print(f"  review sheet:  {dataset / 'report.html'}")
    print(f"  manifest:      {dataset / 'manifest.jsonl'}")
    print(f"  adapter:       {result.adapter}")
    print(f"  tensorboard:   tensorboard --logdir {result.run_dir / 'logs'}")
    print(f"  base video:    {videos[0]}")
    print(f"  LoRA video:    {videos[1]}")
    return 0


def print_learning(result, recipe) -> None:
    """Denoising loss on the training clips at fixed noise and timesteps, without and with the LoRA."""
    from finetune.cache import collate
    from finetune.trainer import fixed_timestep_loss

    transformer = result.family.components.transformer
    transformer.eval()
    batch = collate([result.dataset[i] for i in range(min(8, len(result.dataset)))])
    with_lora = fixed_timestep_loss(result.family, transformer, batch, recipe.fps)
    transformer.disable_adapters()
    base = fixed_timestep_loss(result.family, transformer, batch, recipe.fps)
    transformer.enable_adapters()
    print(f"denoising loss on the training clips: base {base:.3f} -> with LoRA {with_lora:.3f} "
          f"({1 - with_lora / base:.0%} lower)")


def render_pair(run_dir: Path, out: Path) -> tuple[Path, Path]:
    import numpy as np
    import torch

    from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render
    from finetune.video import write_video

    family, info = load_base([], run_dir, torch.device("cpu"), torch.float32)
    pipe = family.pipeline()
    args = complete_args(RenderArgs(prompt=PROMPT, steps=8, guidance=1.0, seed=0), family, info)
    base_video = render(family, pipe, args)
    apply_loras(family, [LoraRef(run_dir)], merge=False)
    lora_video = render(family, pipe, args)
    diff = float(np.abs(base_video.numpy() - lora_video.numpy()).mean())
    print(f"mean |LoRA - base| per pixel: {diff:.4f} (0..1 scale)")
    return write_video(base_video, out / "base.mp4", args.fps), write_video(lora_video, out / "lora.mp4", args.fps)


if __name__ == "__main__":
    sys.exit(main())
