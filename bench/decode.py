"""Reading training clips at cache time: PyAV (what finetune.video.read_clip uses) against decord,
in the same run, on clips data_prep cuts from the sample videos. decord is not a dependency: on
this bench it was no faster (README, Benchmarks); install it to run the comparison.

    python bench/decode.py [--frames 49 --fps 16 --size 832x480] [--repeat 3]

Three reads per clip, each timed for both readers, interleaved (PyAV, then decord, ``--repeat``
times): the whole clip in order (what the cache does when the recipe's fps is the clip's), every
other frame (a recipe at half the clip's fps), and 8 frames at random places (random access). Prints
one table of medians (milliseconds per clip, wall and CPU) with the ratio PyAV / decord (> 1: decord
is faster), checks both return the same frames, and the load average.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIDEOS = [ROOT / "tests/assets" / n for n in ("synth_lavfi.mp4", "bigbuckbunny.mp4", "oa4_launch.webm", "city_cc0.mp4")]


def pyav_read(path: Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (sorted) of ``path`` as [N, H, W, 3] RGB: decode in order, convert the
    wanted ones (finetune.video's way; a seek per frame is slower on clips of a few GOPs)."""
    wanted, out = set(indices), {}
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for i, frame in enumerate(c.decode(s)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    return np.stack([out[i] for i in indices])


def decord_read(path: Path, indices: list[int]) -> np.ndarray:
    import decord  # not a dependency: this bench is why (pip install decord to run it)

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
    return vr.get_batch(indices).asnumpy()


def timed(fn, *args) -> tuple[float, float, np.ndarray]:
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--fps", type=float, default=16)
    p.add_argument("--size", default="832x480")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    try:
        import decord  # noqa: F401
    except ImportError:
        print("decord is not installed (it left the dependencies when this bench found it no faster than PyAV); "
              "pip install decord to run the comparison", file=sys.stderr)
        return 2

    from data_prep import PrepOptions, prepare
    from data_prep.manifest import read_jsonl

    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        footage = Path(tmp) / "footage"
        footage.mkdir()
        for v in VIDEOS:
            (footage / v.name).symlink_to(v)
        opts = PrepOptions(frames=args.frames, fps=args.fps, size=args.size, mode="sliding", filter=False, progress=False)
        prepare(footage, Path(tmp) / "ds", opts, steps=("probe", "split", "cut", "filter", "manifest"))
        clips = [Path(tmp) / "ds" / r["path"] for r in read_jsonl(Path(tmp) / "ds" / "manifest.jsonl")]
        rng = random.Random(0)
        reads = {
            "whole clip, in order": lambda n: list(range(n)),
            "every other frame": lambda n: list(range(0, n, 2)),
            "8 frames at random": lambda n: sorted(rng.sample(range(n), 8)),
        }
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        same = True
        for _ in range(args.repeat):
            for name, pick in reads.items():
                for clip in clips:
                    idx = pick(args.frames)
                    results = {}
                    for reader, fn in (("PyAV", pyav_read), ("decord", decord_read)):
                        w, c, out = timed(fn, clip, idx)
                        times.setdefault((name, reader), []).append((w, c))
                        results[reader] = out
                    same &= bool(np.array_equal(results["PyAV"], results["decord"]))
    load1 = os.getloadavg()
    print(f"\n{len(clips)} clips of {args.frames} frames, {args.size}, H.264 as data_prep writes them; "
          f"{args.repeat} interleaved runs; load average {load0[0]:.2f} before, {load1[0]:.2f} after ({os.cpu_count()} cores)")
    print(f"{'read':24} {'PyAV ms':>9} {'cpu':>7} {'decord ms':>10} {'cpu':>7} {'ratio':>7} {'cpu ratio':>10}")
    for name in reads:
        pa, de = times[(name, "PyAV")], times[(name, "decord")]
        pw, pc = (statistics.median(x[k] for x in pa) * 1e3 for k in (0, 1))
        dw, dc = (statistics.median(x[k] for x in de) * 1e3 for k in (0, 1))
        print(f"{name:24} {pw:9.1f} {pc:7.1f} {dw:10.1f} {dc:7.1f} {pw / dw:6.2f}x {pc / dc:9.2f}x")
    print(f"ratio: PyAV time / decord time (> 1: decord is faster). Same frames from both: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
