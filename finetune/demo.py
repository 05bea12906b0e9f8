"""The embedded demo (``make demo``): a style learned in pixels, offline, on a CPU.

1. data_prep: split the sample footage at its shot cuts, cut 9-frame 32x32 clips, caption them
   with the trigger word; then grade every clip black and white (ffmpeg's ``colorchannelmixer``
   with the luma weights in every row, through a PyAV filter graph): the style to learn;
2. train a LoRA on the graded clips (a fifth held out for the val_loss curve) on top of a tiny
   Wan that was pretrained on the same footage (``assets/tiny-wan-base``, loaded with
   ``from_pretrained``; ``python -m finetune.tiny_base`` made it), so it renders footage-like
   video in natural colours;
3. render one prompt with the same seed without and with the LoRA, side by side (mp4 and a PNG
   strip of frames), and measure the grade on both renders and on the style clips: the mean
   saturation. The demo fails unless the LoRA render moves at least halfway from the base
   render's value toward the style clips'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.cli import add_verbose_flag

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
FOOTAGE = ("synth_lavfi.mp4", "bigbuckbunny.mp4", "oa4_launch.webm")
RECIPE = ROOT / "recipes" / "tiny" / "wan-demo.yaml"
BASE_MODEL = ROOT / "assets" / "tiny-wan-base"
PROMPT = "mystyle, bigbuckbunny"
# Black and white as ffmpeg's colorchannelmixer matrix (rows: output R, G, B from input R, G, B):
# every output channel the Rec. 601 luma. (A sepia grade was the first choice, but the tiny VAE
# cannot hold a warm tint on a grey picture: its decoded sepia clips come back nearly neutral,
# so no LoRA on it could render sepia. It keeps grey pictures grey.)
MONO = "rr=.299:rg=.587:rb=.114:gr=.299:gg=.587:gb=.114:br=.299:bg=.587:bb=.114"
MIN_SHARE = 0.5  # the LoRA render must move at least this share of the way to the style clips


def prepare_clips(out: Path, frames: int, size: int, fps: float, clips_per_shot: int) -> Path:
    """data_prep on the sample footage -> ``out/dataset`` (clips, manifest, review sheet)."""
    from data_prep import PrepOptions, prepare

    footage = out / "footage"
    footage.mkdir(parents=True, exist_ok=True)
    for name in FOOTAGE:
        if not (footage / name).exists():
            shutil.copy2(ASSETS / name, footage / name)
    opts = PrepOptions(family="wan", frames=frames, fps=fps, size=f"{size}x{size}", buckets="fixed",
                       mode="uniform", clips_per_shot=clips_per_shot, trigger="mystyle", progress=False)
    summary = prepare(footage, out / "dataset", opts)
    print(summary.text())
    return out / "dataset"


def grade_video(src: Path, dst: Path, filter_args: str = MONO) -> Path:
    """Re-encode ``src`` to ``dst`` through ffmpeg's colorchannelmixer (a PyAV filter graph),
    same frames and rate."""
    import av

    from finetune.video import Mp4Writer

    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        chain = [graph.add_buffer(template=stream), graph.add("format", "rgb24"),
                 graph.add("colorchannelmixer", filter_args), graph.add("buffersink")]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        writer = Mp4Writer(dst, float(stream.average_rate), stream.codec_context.width, stream.codec_context.height)
        try:
            for frame in container.decode(stream):
                graph.push(frame)
                writer.add(graph.pull().to_ndarray(format="rgb24"))
        except BaseException:
            writer.abort()
            raise
    return writer.close()


def grade_dataset(dataset: Path, out: Path) -> Path:
    """Every clip of ``dataset``'s manifest graded into ``out`` with the same captions; returns
    the new manifest."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        src = Path(row["path"]) if Path(row["path"]).is_absolute() else dataset / row["path"]
        grade_video(src, out / src.name)
        row["path"] = src.name
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# ---------------------------------------------------------------------------- the style statistic


def warmth(frames: np.ndarray) -> float:
    """Mean of red minus blue over all pixels, frames [..., 3] in [0, 1] (printed beside
    saturation, not checked): 0 for black and white."""
    frames = np.asarray(frames, dtype=np.float64)
    return float((frames[..., 0] - frames[..., 2]).mean())


def saturation(frames: np.ndarray) -> float:
    """Mean HSV saturation, frames [..., 3] in [0, 1]: the style statistic, 0 for black and white."""
    frames = np.asarray(frames, dtype=np.float64)
    hi, lo = frames.max(-1), frames.min(-1)
    return float(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-8), 0.0).mean())


@dataclass
class StyleCheck:
    base: float
    lora: float
    style: float

    @property
    def share(self) -> float:
        """How far the LoRA render moved from the base render toward the style clips (1 = all the way)."""
        gap = self.style - self.base
        return (self.lora - self.base) / gap if abs(gap) > 1e-9 else float("nan")

    @property
    def passed(self) -> bool:
        return self.share >= MIN_SHARE


def style_clip_frames(manifest: Path, frames: int, fps: float, size: int) -> np.ndarray:
    """Every style clip as the trainer reads it: [N, F, H, W, 3] in [0, 1]."""
    from finetune.data import load_manifest
    from finetune.video import read_clip

    clips = [read_clip(c.path, frames, fps, size, size) for c in load_manifest(manifest)]
    return np.stack([((v.permute(1, 2, 3, 0).numpy() + 1) / 2) for v in clips])


def print_table(rows: dict[str, np.ndarray], check: StyleCheck) -> None:
    print(f"\n{'':24}{'saturation':>12}{'warmth (R-B)':>14}")
    for name, frames in rows.items():
        print(f"{name:24}{saturation(frames):>12.3f}{warmth(frames):>14.3f}")
    verdict = "ok" if check.passed else f"FAILED (needs {MIN_SHARE:.0%})"
    print(f"saturation: the LoRA render moved {check.share:.0%} of the way from the base render to the style clips: {verdict}")


# ---------------------------------------------------------------------------- pictures


def frame_strip(rows: list[np.ndarray], path: Path, scale: int = 4, gap: int = 2) -> Path:
    """PNG of videos as rows of frames (each [F, H, W, 3] in [0, 1], same F, H, W), enlarged
    ``scale`` times with nearest-neighbour so the pixels stay visible."""
    from PIL import Image

    n, h, w, _ = rows[0].shape
    sheet = np.ones((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3))
    for r, video in enumerate(rows):
        for f in range(n):
            sheet[r * (h + gap):r * (h + gap) + h, f * (w + gap):f * (w + gap) + w] = video[f]
    img = Image.fromarray((sheet * 255).round().astype(np.uint8))
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)
    return path


def render_pair(run_dir: Path, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The demo prompt without and with the run's LoRA, same seed: two [F, H, W, 3] in [0, 1], fps."""
    import torch

    from finetune.inference import RenderArgs, complete_args, load_base, render_base_then_lora

    family, info = load_base([], run_dir, torch.device("cpu"), torch.float32)
    pipe = family.pipeline()
    pipe.set_progress_bar_config(disable=True)
    args = complete_args(RenderArgs(prompt=PROMPT, steps=steps, guidance=1.0, seed=seed), family, info)
    frames = {which: f.numpy() for which, _, f, _ in render_base_then_lora(family, pipe, run_dir, [args])}
    return frames["base"], frames["lora"], args.fps


# ---------------------------------------------------------------------------- main


def run(out: Path, steps: int, clips_per_shot: int, base_model: Path = BASE_MODEL) -> StyleCheck:
    """The whole demo into ``out``; returns the style check (printed with every path)."""
    import torch

    from finetune.config import load_recipe
    from finetune.trainer import train
    from finetune.video import write_video

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    recipe = load_recipe(RECIPE, [f"model.pretrained={base_model}"])
    d, size = recipe.data, recipe.data.width
    print(f"== 1/3 data_prep: {', '.join(FOOTAGE)} -> clips of {d.frames} frames, {size}x{size} at {recipe.fps:g} fps, "
          f"then a black-and-white grade")
    dataset = prepare_clips(out, d.frames, size, recipe.fps, clips_per_shot)
    manifest = grade_dataset(dataset, out / "style")

    print(f"== 2/3 train: {RECIPE.relative_to(ROOT)}, {steps} steps, on {base_model}")
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # a demo run starts fresh; real runs resume with --resume latest
    recipe = load_recipe(RECIPE, [f"model.pretrained={base_model}", f"data.manifest={manifest}", f"output.dir={out / 'run'}", f"optim.steps={steps}",
                                  f"validation.every={max(1, steps // 2)}"])
    result = train(recipe)

    print("== 3/3 render the same prompt and seed without and with the LoRA")
    v = recipe.validation
    base, lora, fps = render_pair(result.run_dir, v.steps, v.seed)
    style = style_clip_frames(manifest, d.frames, recipe.fps, size)
    check = StyleCheck(base=saturation(base), lora=saturation(lora), style=saturation(style))
    from finetune.video import side_by_side

    pair = side_by_side(torch.from_numpy(base), torch.from_numpy(lora)).numpy()
    videos = (write_video(base, out / "base.mp4", fps), write_video(lora, out / "lora.mp4", fps),
              write_video(pair, out / "base_vs_lora.mp4", fps))
    strip = frame_strip([style[0], base, lora], out / "base_vs_lora.png")

    print_table({"style clips (training)": style, "base render": base, "LoRA render": lora}, check)
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s")
    print(f"  side by side:  {videos[2]}  (left: base, right: with the LoRA; prompt {PROMPT!r})")
    print(f"  frame strip:   {strip}  (rows: a style clip, base, with the LoRA)")
    print(f"  base, LoRA:    {videos[0]}, {videos[1]}")
    print(f"  review sheet:  {dataset / 'report.html'}")
    print(f"  style clips:   {manifest}")
    print(f"  adapter:       {result.adapter}")
    print(f"  tensorboard:   tensorboard --logdir {result.run_dir / 'logs'}  (loss, val_loss on held-out clips, "
          f"base | LoRA samples)")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps")
    parser.add_argument("--clips-per-shot", type=int, default=2, help="clips data_prep cuts from each shot")
    parser.add_argument("--base-model", type=Path, default=BASE_MODEL, help="the pretrained tiny Wan (diffusers folder)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    check = run(args.out, args.steps, args.clips_per_shot, args.base_model)
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
