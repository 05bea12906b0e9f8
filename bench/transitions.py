"""How exactly split finds fades and dissolves: every pair of the sample shots joined by ffmpeg's
xfade (dissolves of 4 to 48 frames), fade (to black and back, with and without black frames held)
and a hard cut, the truth from the same edit in solid colours (tests/data_prep_fixtures.compose).
Baseline, in the same run: PySceneDetect's detector alone (``transitions=False``).

    python bench/transitions.py [--pairs N]   # N pairs of shots per join (default all 16; ~6 min on 2 cores)

Prints, per join: edits whose shots were all found, the largest and mean error of a shot's first or
last frame (frames), and how many mixed or black frames ended up inside a shot, ours and baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NAMES = ["bunny", "pad", "rocket", "city", "towers"]
LENGTH = {"bunny": 60, "pad": 60, "rocket": 70, "city": 70, "towers": 60}
SAME_SOURCE = [{"pad", "rocket"}, {"city", "towers"}]  # two shots of one video: not joined to each other
JOINS = [("dissolve", 4), ("dissolve", 8), ("dissolve", 16), ("dissolve", 24), ("dissolve", 36), ("dissolve", 48),
         ("fade", 12, 0, 12), ("fade", 8, 6, 16), ("fade", 24, 12, 6), ("cut",)]  # fmt: skip


def score(shots: list[tuple[int, int]], truth) -> tuple[bool, list[int], int]:
    """(same number of shots, |error| of every shot end, transition frames inside found shots)."""
    inside = sum(max(0, min(b, tb) - max(a, ta)) for a, b in shots for ta, tb in truth.transitions)
    if len(shots) != len(truth.shots):
        return False, [], inside
    return True, [abs(x - y) for got, want in zip(shots, truth.shots) for x, y in zip(got, want)], inside


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=None, help="pairs of shots per join (default: all)")
    args = p.parse_args(argv)

    from data_prep_fixtures import compose

    from data_prep.probe import probe_file
    from data_prep.split import detect_shots

    pairs = [(a, b) for a in NAMES for b in NAMES if a != b and {a, b} not in SAME_SOURCE][: args.pairs]
    print(f"{len(pairs)} pairs of sample shots per join; errors in frames (first and last frame of every shot)")
    print(f"{'join':22} {'found':>7} {'max err':>8} {'mean err':>9} {'mixed in shots':>15} | "
          f"{'baseline found':>14} {'mixed in shots':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for join in JOINS:
            rows = {"ours": [], "base": []}
            for a, b in pairs:
                edit = compose(Path(tmp) / f"{a}_{b}.mp4", [(a, LENGTH[a]), join, (b, LENGTH[b])])
                probe = probe_file(edit.path)
                for key, tr in (("ours", True), ("base", False)):
                    found = detect_shots(probe, transitions=tr)
                    rows[key].append(score([(s.start_frame, s.end_frame) for s in found.shots], edit))
            errs = [e for ok, es, _ in rows["ours"] for e in es]
            name = " ".join(map(str, join))
            print(f"{name:22} {sum(r[0] for r in rows['ours']):3d}/{len(pairs):<3d} {max(errs, default=0):8d} "
                  f"{statistics.mean(errs) if errs else 0:9.2f} {sum(r[2] for r in rows['ours']):15d} | "
                  f"{sum(r[0] for r in rows['base']):10d}/{len(pairs):<3d} {sum(r[2] for r in rows['base']):15d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
