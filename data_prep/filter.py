"""filter: set aside clips that would teach the wrong thing: near-duplicates, nearly static, very
dark or blurred. Nothing is deleted: rejected clips stay in clips/ and are listed with the reason.

Stats are measured once, on frames sampled while the clip is written, and kept in the run state,
so filtering again with other thresholds needs no decoding.
"""

from __future__ import annotations

import cv2
import imagehash
import numpy as np
from PIL import Image


def clip_stats(samples: list[np.ndarray]) -> dict:
    """Stats of one clip from RGB samples [H, W, 3] uint8 spread over it (first and last included).

    phash: 64-bit perceptual hash (hex) of each sample; luma: mean luma 0-255; blur: variance of the
    Laplacian of the middle sample; motion: mean absolute grey-level change between neighbouring
    samples (0-255).
    """
    grey = [cv2.cvtColor(s, cv2.COLOR_RGB2GRAY) for s in samples]
    mid = grey[len(grey) // 2]
    motion = float(np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in zip(grey, grey[1:])])) if len(grey) > 1 else 0.0
    return {
        "phash": [str(imagehash.phash(Image.fromarray(s))) for s in samples],
        "luma": round(float(np.mean([g.mean() for g in grey])), 3),
        "blur": round(float(cv2.Laplacian(mid, cv2.CV_64F).var()), 3),
        "motion": round(motion, 3),
    }


def hash_distance(a: list[str], b: list[str]) -> float:
    """Mean Hamming distance in bits between two clips' sample hashes, position by position."""
    n = min(len(a), len(b))
    if n == 0:
        return 64.0
    return sum(imagehash.hex_to_hash(x) - imagehash.hex_to_hash(y) for x, y in zip(a[:n], b[:n])) / n


def find_rejects(
    clips: list[tuple[str, dict]],
    dup_distance: float = 4.0,
    static_threshold: float = 0.8,
    dark_threshold: float = 12.0,
    blur_threshold: float = 8.0,
) -> dict[str, str]:
    """Reasons, by clip name, for the clips to set aside. ``clips``: (name, stats) in dataset order;
    of near-duplicates the first is kept. Each clip gets the first reason that applies."""
    rejects: dict[str, str] = {}
    kept: list[tuple[str, np.ndarray]] = []
    for name, st in clips:
        if st["luma"] < dark_threshold:
            rejects[name] = f"too dark (mean luma {st['luma']:.1f} < {dark_threshold:g})"
        elif st["motion"] < static_threshold:
            rejects[name] = f"nearly static (motion {st['motion']:.2f} < {static_threshold:g})"
        elif st["blur"] < blur_threshold:
            rejects[name] = f"blurred (sharpness {st['blur']:.1f} < {blur_threshold:g})"
        else:
            bits = _bits(st["phash"])
            for other, obits in kept:
                if len(obits) == len(bits):
                    d = float(np.count_nonzero(bits != obits)) / len(bits)
                    if d <= dup_distance:
                        rejects[name] = f"near-duplicate of {other} (hash distance {d:.1f} <= {dup_distance:g} bits)"
                        break
            else:
                kept.append((name, bits))
    return rejects


def _bits(hashes: list[str]) -> np.ndarray:
    """Sample hashes as a bool array [n_samples, 64] for fast Hamming distances."""
    return np.array([imagehash.hex_to_hash(h).hash.flatten() for h in hashes], dtype=bool)
