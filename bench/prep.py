"""Throughput of ``data_prep.prepare`` (no captioning) on the sample videos, against the ffmpeg
command line doing the same work in the same run: ffmpeg's ``scdet`` filter for shot detection,
then one ffmpeg process per clip of our manifest (seek, fps resample, scale + centre crop, libx264
with the same preset and CRF). The ffmpeg binary is the one inside the imageio-ffmpeg wheel.

    python bench/prep.py [--videos DIR_OR_FILES ...] [--frames 17 --fps 16 --size 832x480 --mode sliding] [--repeat 3]

The two are run interleaved (ours, then ffmpeg's, ``--repeat`` times) so a shared machine's load
falls on both alike. Prints one table of medians: stage, seconds, clips/s, ratio (ffmpeg time /
data_prep time; > 1 means data_prep is faster), the range of the ratio over the repeats, the same
ratio in CPU-seconds (ours: every thread of this process; ffmpeg's: its processes), and the load
average; then the cuts each found per video (ours must be the same in every repeat).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VIDEOS = [ROOT / "tests/assets" / n for n in ("synth_lavfi.mp4", "bigbuckbunny.mp4", "oa4_launch.webm")]
# the project's shared sample videos sit beside the checkout (main) or two levels up (a worktree)
SHARED_CITY = next((p for p in (ROOT.parent / "shared/videos/cityCC0.mpg", ROOT.parents[1] / "shared/videos/cityCC0.mpg") if p.is_file()), ROOT.parent / "shared/videos/cityCC0.mpg")


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


def clocks() -> tuple[float, float, float]:
    """(wall, CPU seconds of this process, CPU seconds of its finished child processes)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time(), kids.ru_utime + kids.ru_stime


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", nargs="*", type=Path, default=None, help="videos (default: tests/assets samples, plus cityCC0.mpg if ../shared has it)")
    p.add_argument("--family", default="wan")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--size", default="832x480")
    p.add_argument("--mode", default="sliding", choices=("head", "uniform", "sliding"))
    p.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; the table shows medians")
    args = p.parse_args(argv)

    from data_prep import PrepOptions, prepare
    from data_prep.manifest import read_jsonl
    from data_prep.options import family_facts
    from data_prep.probe import probe_file

    videos = args.videos or DEFAULT_VIDEOS + ([SHARED_CITY] if SHARED_CITY.is_file() else [])
    family_facts(args.family)  # import torch/diffusers before the clock starts
    exe = ffmpeg_exe()
    opts = PrepOptions(family=args.family, frames=args.frames, fps=args.fps, size=args.size, mode=args.mode, filter=False, progress=False)
    stages = ("split (probe + shots)", "cut (decode, resample, encode)", "total")
    # per stage and side: wall seconds and CPU seconds (ours: this process, all threads; ffmpeg: its
    # child processes), one entry per repeat
    ours: dict[str, list[tuple[float, float]]] = {k: [] for k in stages}
    theirs: dict[str, list[tuple[float, float]]] = {k: [] for k in stages}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        footage = tmp / "footage"
        footage.mkdir()
        for v in videos:
            shutil.copy(v, footage / v.name)
        # clip times are from the first frame; ffmpeg -ss counts from the container's zero
        starts = {str(footage / v.name): probe_file(footage / v.name).start_time for v in videos}
        cuts_seen = []
        for rep in range(args.repeat):
            ds = tmp / f"ds{rep}"
            t0 = clocks()
            split = prepare(footage, ds, opts, steps=("probe", "split"))
            t1 = clocks()
            cut = prepare(footage, ds, opts, steps=("probe", "split", "cut", "filter", "manifest"))
            t2 = clocks()
            rows = read_jsonl(ds / "manifest.jsonl")
            assert cut.clips_written == len(rows), "the split step should be reused, not redone"
            cuts_seen.append(split.cuts)

            t3 = clocks()
            scdet = {v.name: ffmpeg_scdet(exe, footage / v.name) for v in videos}
            t4 = clocks()
            ff = tmp / f"ff{rep}"
            ff.mkdir()
            for i, row in enumerate(rows):
                ffmpeg_cut(exe, row, starts[row["source"]], ff / f"{i:04d}.mp4", opts.crf, opts.preset)
            t5 = clocks()
            for store, (a, b, c), side in ((ours, (t0, t1, t2), 1), (theirs, (t3, t4, t5), 2)):
                for stage, (u, v) in zip(stages, ((a, b), (b, c), (a, c))):
                    store[stage].append((v[0] - u[0], v[side] - u[side]))
    load1 = os.getloadavg()

    n = len(rows)
    print(f"\n{len(videos)} videos, {n} clips of {args.frames} frames at {args.fps:g} fps, {args.size} buckets, mode {args.mode}; "
          f"median of {args.repeat} interleaved runs; load average {load0[0]:.2f} before, {load1[0]:.2f} after ({os.cpu_count()} cores)")  # fmt: skip
    print("ratio: ffmpeg CLI time / data_prep time (> 1: data_prep is faster); cpu: CPU-seconds, all threads and processes")
    print(f"{'stage':32} {'data_prep s':>12} {'cpu':>6} {'ffmpeg CLI s':>13} {'cpu':>6} {'clips/s ours':>13} {'ratio':>7} "
          f"{'ratio range':>14} {'cpu ratio':>10}")  # fmt: skip
    for k in stages:
        (mine, mine_cpu), (base, base_cpu) = _median(ours[k]), _median(theirs[k])
        ratios = [b[0] / a[0] for a, b in zip(ours[k], theirs[k])]
        rate = f"{n / mine:.2f}" if k != stages[0] else "-"
        print(f"{k:32} {mine:12.2f} {mine_cpu:6.2f} {base:13.2f} {base_cpu:6.2f} {rate:>13} {base / mine:6.2f}x "
              f"{min(ratios):6.2f}-{max(ratios):.2f}x {base_cpu / mine_cpu:9.2f}x")  # fmt: skip
    same = all(c == cuts_seen[0] for c in cuts_seen)
    print(f"\nshot cuts found (first frame of each new shot; ffmpeg scdet reports times); ours the same in every run: {same}")
    for v in videos:
        src = str(footage / v.name)
        print(f"  {v.name:20} data_prep({opts.detector}): {split.cuts.get(src)}   ffmpeg scdet: {[round(t, 3) for t in scdet[v.name]]} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
