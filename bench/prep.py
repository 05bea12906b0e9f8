"""Throughput of ``data_prep.prepare`` (no captioning) on the sample videos, against the ffmpeg
command line doing the same work in the same run: ffmpeg's ``scdet`` filter for shot detection,
then one ffmpeg process per clip of our manifest (seek, fps resample, scale + centre crop, libx264
with the same preset and CRF). The ffmpeg binary is the one inside the imageio-ffmpeg wheel.

    python bench/prep.py [--videos DIR_OR_FILES ...] [--frames 17 --fps 16 --size 832x480 --mode sliding]

Prints one table: stage, seconds, clips/s, ratio (ffmpeg time / data_prep time; > 1 means data_prep
is faster). Also prints the cuts each detector found per video.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VIDEOS = [ROOT / "tests/assets" / n for n in ("synth_lavfi.mp4", "bigbuckbunny.mp4", "oa4_launch.webm")]
SHARED_CITY = ROOT.parent / "shared/videos/cityCC0.mpg"


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_scdet(exe: str, src: Path, threshold: float = 10.0) -> list[float]:
    """Cut times (s) ffmpeg's scdet filter reports."""
    out = subprocess.run(
        [exe, "-hide_banner", "-nostats", "-i", str(src), "-an", "-vf", f"scdet=threshold={threshold}", "-f", "null", "-"],
        capture_output=True, text=True, check=True,
    ).stderr  # fmt: skip
    return [float(line.split("lavfi.scd.time:")[1].split()[0]) for line in out.splitlines() if "lavfi.scd.time:" in line]


def ffmpeg_cut(exe: str, row: dict, src_start: float, out: Path, crf: int, preset: str) -> None:
    """One clip as a person would write it with ffmpeg: same start, frames, fps, size, encoder."""
    w, h = row["width"], row["height"]
    vf = f"fps={row['fps']},scale={w}:{h}:force_original_aspect_ratio=increase,crop={w}:{h},format=yuv420p"
    cmd = [exe, "-v", "error", "-y", "-ss", f"{src_start + row['start_time']:.6f}", "-i", row["source"], "-an",
           "-vf", vf, "-frames:v", str(row["frames"]), "-c:v", "libx264", "-preset", preset, "-crf", str(crf), str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", nargs="*", type=Path, default=None, help="videos (default: tests/assets samples, plus cityCC0.mpg if ../shared has it)")
    p.add_argument("--family", default="wan")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--size", default="832x480")
    p.add_argument("--mode", default="sliding", choices=("head", "uniform", "sliding"))
    args = p.parse_args(argv)

    from data_prep import PrepOptions, prepare
    from data_prep.manifest import read_jsonl
    from data_prep.options import family_facts
    from data_prep.probe import probe_file

    videos = args.videos or DEFAULT_VIDEOS + ([SHARED_CITY] if SHARED_CITY.is_file() else [])
    family_facts(args.family)  # import torch/diffusers before the clock starts
    exe = ffmpeg_exe()
    opts = PrepOptions(family=args.family, frames=args.frames, fps=args.fps, size=args.size, mode=args.mode, filter=False, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        footage = tmp / "footage"
        footage.mkdir()
        for v in videos:
            shutil.copy(v, footage / v.name)
        t0 = time.perf_counter()
        split = prepare(footage, tmp / "ds", opts, steps=("probe", "split"))
        t1 = time.perf_counter()
        cut = prepare(footage, tmp / "ds", opts, steps=("probe", "split", "cut", "filter", "manifest"))
        t2 = time.perf_counter()
        rows = read_jsonl(tmp / "ds" / "manifest.jsonl")
        assert cut.clips_written == len(rows), "the split step should be reused, not redone"

        t3 = time.perf_counter()
        scdet = {v.name: ffmpeg_scdet(exe, footage / v.name) for v in videos}
        t4 = time.perf_counter()
        (tmp / "ff").mkdir()
        # clip times are from the first frame; ffmpeg -ss counts from the container's zero
        starts = {str(footage / v.name): probe_file(footage / v.name).start_time for v in videos}
        for i, row in enumerate(rows):
            ffmpeg_cut(exe, row, starts[row["source"]], tmp / "ff" / f"{i:04d}.mp4", opts.crf, opts.preset)
        t5 = time.perf_counter()

    n = len(rows)
    ours = {"split (probe + shots)": t1 - t0, "cut (decode, resample, encode)": t2 - t1, "total": t2 - t0}
    theirs = {"split (probe + shots)": t4 - t3, "cut (decode, resample, encode)": t5 - t4, "total": t5 - t3}
    print(f"\n{len(videos)} videos, {n} clips of {args.frames} frames at {args.fps:g} fps, {args.size} buckets, mode {args.mode}")
    print(f"{'stage':32} {'data_prep s':>12} {'ffmpeg CLI s':>13} {'clips/s ours':>13} {'ratio':>7}")
    for k in ours:
        rate = f"{n / ours[k]:.2f}" if k != "split (probe + shots)" else "-"
        print(f"{k:32} {ours[k]:12.2f} {theirs[k]:13.2f} {rate:>13} {theirs[k] / ours[k]:6.2f}x")
    print("\nshot cuts found (first frame of each new shot; ffmpeg scdet reports times):")
    for v in videos:
        src = str(footage / v.name)
        print(f"  {v.name:20} data_prep({opts.detector}): {split.cuts.get(src)}   ffmpeg scdet: {[round(t, 3) for t in scdet[v.name]]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
