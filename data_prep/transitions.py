"""transitions: cross-dissolves and fades to black, found frame-exactly from small thumbnails.

A gradual transition is a stretch of frames that mix two pictures. In a cross-dissolve from shot
A to shot B every frame is ``(1 - a) * A + a * B`` with ``a`` rising from 0 to 1; a fade out is
the same mix with black as B, a fade in with black as A. So the test for a transition is a
model, not a threshold on one pair of frames:

1. Candidates (first stage): ``far[t]``, the mean absolute difference between frame t and frame
   t - k (k about half a second), rises wherever the picture changes over that distance: a
   dissolve, a fade, a hard cut or plain motion. Each bump of ``far`` is a candidate; frames
   below ``black_level`` are fades whatever ``far`` says.
2. The mix (second stage): with X a frame before the bump and Y one after it, every frame
   between is projected on the line from X to Y, which gives its mixing weight ``a[t]`` and how
   far it lies off the line. A ramp (0 before s, rising over [s, e), 1 from e) is fitted to
   ``a`` by least squares over every s, e; the fit is repeated with X = frame s - 1 and
   Y = frame e until it stays put, then each end is moved to where the weights bend (a two-piece
   line fitted near it: motion during a long dissolve bows the weights, pulling a straight
   ramp's ends inwards).
3. Checks: at least ``min_frames`` mixed frames, at most ``max_s`` seconds; X and Y differ as
   two shots do, in pixels and in colour histograms; the mixed frames lie near the line from X
   to Y and their weights follow a straight ramp from 0 to 1; the clean frames on each side (2
   at least) stay at their end of the line (a pan or a zoom drifts on past its "ends").

A fade to black is split at its black frames: the fade out (picture to black) and the fade in
(black to picture) are fitted separately, and the transition runs from the first darkened
frame to the last, black frames included, so the clean frames on both sides stay in their shots.

Everything here is numpy on thumbnails ``[n, h, w, 3]`` uint8 (32 px wide: 1.7 kB a frame,
187 MB for an hour at 30 fps, made float only a window at a time), so detection costs nothing per
decoded frame beyond the resize.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THUMB_WIDTH = 32


@dataclass(frozen=True)
class Transition:
    """Frames [start, end) that belong to no shot; ``kind``: "dissolve" or "fade"."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class Settings:
    """Bounds of what counts as a transition (the defaults suit 8-bit footage of any size)."""

    span_s: float = 0.5  # k: the distance in seconds over which candidates are compared
    min_frames: int = 3  # fewer mixed frames: a hard cut (PySceneDetect's business)
    max_s: float = 3.0  # longest dissolve, and longest fade out or fade in
    candidate_diff: float = 8.0  # far[t] (0-255) from which a bump is looked at
    shot_diff: float = 12.0  # X and Y must differ by this much (mean absolute, 0-255)
    # and so must their colours: mean Bhattacharyya distance of their Y, U and V histograms (16
    # bins): 0.22-0.54 between the sample shots, 0.13 across a zoom into a fractal
    shot_hist: float = 0.18
    # mixed frames' mean distance from the X-Y line, relative to |Y - X|: 0.01-0.2 in dissolves
    # and fades of the sample shots (0.2: the bunny climbing through a 36-frame dissolve), 0.3-0.6
    # for the motion of the samples' other candidates
    max_off_line: float = 0.3
    max_drift: float = 0.1  # mean |weight - 0| of the clean frames before, |weight - 1| after (within k)
    min_clean: int = 2  # clean frames a shot shows on its side of a transition, at least
    max_ramp_dev: float = 0.1  # mean |weight - straight ramp| of the mixed frames (eased fades stay under it)
    black_level: float = 6.0  # mean level (0-255) under which a frame is black


def find_transitions(thumbs: np.ndarray, rate: float, hard_cuts: list[int] = (),
                     settings: Settings = Settings()) -> list[Transition]:
    """Dissolves and fades in ``thumbs`` [n, h, w, 3] uint8 (every decoded frame, in order) of a
    video at ``rate`` fps, as sorted, disjoint transitions. ``hard_cuts`` (first frames of new
    shots) bound the frames a candidate may be fitted with."""
    n = len(thumbs)
    if n < 4:
        return []
    frames = thumbs.reshape(n, -1)  # uint8 [n, d]: windows are made float where they are used
    level = frames.mean(1)
    k = max(2, round(settings.span_s * rate))
    max_len = max(settings.min_frames + 1, round(settings.max_s * rate))
    cuts = sorted(c for c in set(hard_cuts) if 0 < c < n)
    found: list[Transition] = []
    for b0, b1 in _runs(level < settings.black_level):
        found.append(_fade(thumbs, frames, b0, b1, k, max_len, cuts, settings))
    far = np.zeros(n, np.float32)
    for i in range(k, n, 4096):  # in chunks: a float copy of an hour of thumbnails would take 750 MB
        j = min(n, i + 4096)
        far[i:j] = np.abs(frames[i:j].astype(np.int16) - frames[i - k : j - k]).mean(1)
    taken = np.zeros(n, bool)
    for t in found:  # a fade's bump is explained
        taken[t.start : min(n, t.end + k)] = True
    while True:
        free = np.flatnonzero((far >= settings.candidate_diff) & ~taken)
        if not len(free):
            break
        peak = int(free[np.argmax(far[free])])
        r0, r1 = _bump(far, taken, peak, max(settings.candidate_diff, 0.5 * far[peak]))
        taken[r0:r1] = True
        if any(abs(r0 - c) <= 1 and r1 <= c + k + 1 for c in cuts):
            continue  # the k frames after a hard cut differ from those k before: nothing more
        t, fitted = _dissolve(thumbs, frames, r0, r1, k, max_len, cuts, settings)
        if fitted is not None:  # found or not, the rest of its bump is the same event, not a new one
            taken[fitted[0] : min(n, fitted[1] + k)] = True
        if t is not None:
            found.append(t)
    return _disjoint(found)


# ---------------------------------------------------------------------------------------------
# the model


def mix_weights(frames: np.ndarray, x: int, y: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """For frames [lo, hi) of ``frames`` [n, d] (any dtype): the weight ``a`` of frame y in each as
    a mix of frames x and y (projection on the line from x to y), and each one's distance from
    that line relative to |frame y - frame x|. Both [hi - lo] float32."""
    base = frames[x].astype(np.float32)
    d = frames[y] - base
    norm2 = float(d @ d) or 1e-6
    rel = frames[lo:hi] - base
    a = rel @ d / norm2
    off = np.linalg.norm(rel - a[:, None] * d[None], axis=1) / np.sqrt(norm2)
    return a, off


def fit_ramp(a: np.ndarray, min_mixed: int = 0) -> tuple[int, int, float]:
    """The ramp that best fits weights ``a`` [m]: (s, e, sse) with 1 <= s <= e <= m - 1 indices
    into ``a``: ramp 0 before s, (t - s + 1) / (e - s + 1) on [s, e) (the mixed frames), 1 from
    e, plus the offset and scale that fit best (least squares: motion drifts the weights of clean
    frames). Only rising ramps with at least ``min_mixed`` mixed frames are tried. At least one
    frame stays flat at each end: without it a straight line is as well fitted by a ramp one
    frame longer, scaled. O(m^3) work, O(m^2) memory: one row of ends per start."""
    m = len(a)
    t = np.arange(m)
    am = a - a.mean()
    total = float(am @ am)
    best = (1, m - 1, np.inf)
    for s in range(1, m - 1):
        e = np.arange(s + max(min_mixed, 0), m)
        if not len(e):
            break
        r = np.clip((t[None, :] - s + 1) / (e - s + 1)[:, None], 0.0, 1.0)
        r[t[None, :] >= e[:, None]] = 1.0
        r -= r.mean(1, keepdims=True)
        var = (r * r).sum(1)
        cov = (r * am).sum(1)
        # residual of the best offset and scale: |a - mean|^2 - cov^2 / var
        sse = np.where((var > 1e-9) & (cov > 0), total - cov * cov / np.maximum(var, 1e-9), np.inf)
        j = int(np.argmin(sse))
        if sse[j] < best[2]:
            best = (s, int(e[j]), float(sse[j]))
    return best


def kink(a: np.ndarray, lo: int, hi: int) -> int:
    """The index p in [lo, hi] of ``a`` where a line through a[lo..p] meets a line through
    a[p..hi] best (least squares on a continuous two-piece line with its vertex at p)."""
    t = np.arange(lo, hi + 1, dtype=np.float64)
    y = a[lo : hi + 1].astype(np.float64)
    best, where = np.inf, lo
    for p in range(lo + 1, hi):
        basis = np.stack([np.ones_like(t), np.minimum(t - p, 0), np.maximum(t - p, 0)], 1)
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        sse = float(((basis @ coef - y) ** 2).sum())
        if sse < best:
            best, where = sse, p
    return where


def _fit(frames: np.ndarray, x: int, y: int, min_mixed: int) -> tuple[int, int]:
    """Mixed frames [s, e) between frames x and y: a ramp fitted on the line from x to y, then
    again on the line between the frames just outside it until it stays put (3 rounds at most);
    then each end on its own, where the weights bend (a long dissolve over motion bows, which
    pulls a straight ramp's ends inwards)."""
    lo, hi = x, y
    s = e = -1
    for _ in range(4):
        a, _ = mix_weights(frames, lo, hi, x, y + 1)
        s2, e2, _ = fit_ramp(a, min_mixed)
        if (x + s2, x + e2) == (s, e):
            break
        s, e = x + s2, x + e2
        lo, hi = s - 1, e
    a, _ = mix_weights(frames, s - 1, e, x, y + 1)
    w = max(2, min(12, (e - s) // 2, s - 1 - x, y - e))
    i0, i1 = s - 1 - x, e - x
    # an end with fewer than two frames beyond it in the window (black frames of a fade) stays
    s3 = kink(a, i0 - w, min(i1 - 1, i0 + w)) + x + 1 if i0 - w >= 0 else s
    e3 = kink(a, max(i0 + 1, i1 - w), i1 + w) + x if i1 + w < len(a) else e
    if e3 - s3 >= min_mixed:
        s, e = s3, e3
    return s, e


def _mix_ok(thumbs: np.ndarray, frames: np.ndarray, s: int, e: int, lo: int, hi: int, k: int, st: Settings,
            pictures: tuple[bool, bool] = (True, True)) -> bool:
    """Frames [s, e) are a steady mix of frame s - 1 and frame e, and the clean frames within
    ``k`` of it (inside [lo, hi]) stay at their end of the line. ``pictures``: whether the frames
    before and after are shots (False: black, one side of a fade); a shot's side needs at least
    ``min_clean`` frames to show it stays put (a file that brightens from its first frame to its
    last is a mix of the two, but no transition), and two shots must differ as shots do."""
    x, y = s - 1, e
    if x < 0 or y >= len(frames) or e - s < st.min_frames:
        return False
    if all(pictures) and (np.abs(frames[y].astype(np.float32) - frames[x]).mean() < st.shot_diff
                          or hist_distance(thumbs[x], thumbs[y]) < st.shot_hist):
        return False
    a0, a1 = max(lo, x - k), min(hi, y + k) + 1
    a, off = mix_weights(frames, x, y, a0, a1)
    mixed = slice(s - a0, e - a0)
    ramp = (np.arange(e - s) + 1) / (e - s + 1)
    before, after = a[: x - a0], a[y + 1 - a0 :]
    if (pictures[0] and len(before) < st.min_clean) or (pictures[1] and len(after) < st.min_clean):
        return False
    # a zoom or a pan drifts on past the ends of its "ramp": a dissolve's shots stay put
    drift = max(np.abs(before).mean() if len(before) else 0.0, np.abs(after - 1).mean() if len(after) else 0.0)
    return bool(off[mixed].mean() <= st.max_off_line and np.abs(a[mixed] - ramp).mean() <= st.max_ramp_dev
                and drift <= st.max_drift)


def _bounds(lo: int, hi: int, cuts: list[int], around: tuple[int, int]) -> tuple[int, int]:
    """[lo, hi] shrunk so that no hard cut lies between it and the frames ``around``."""
    a, b = around
    for c in cuts:
        if lo < c <= a:
            lo = c
        if b < c <= hi:
            hi = c - 1
    return lo, hi


def _dissolve(thumbs, frames, r0: int, r1: int, k: int, max_len: int, cuts: list[int], st: Settings
              ) -> tuple[Transition | None, tuple[int, int] | None]:
    """The dissolve behind the bump [r0, r1) of ``far`` if there is one, and the frames [s, e) the
    ramp was fitted to whether it was or not (None if nothing could be fitted)."""
    n = len(frames)
    x, y = max(0, r0 - k - 1), min(n - 1, r1)
    if y - x > max_len + 2 * k:  # a long stretch of change: motion, not one mix
        return None, None
    x, y = _bounds(x, y, cuts, (r0 - 1, min(n - 1, r1 - 1)))
    if y - x < st.min_frames + 1:
        return None, None
    s, e = _fit(frames, x, y, st.min_frames)
    if e - s > max_len or not _mix_ok(thumbs, frames, s, e, x, y, k, st):
        return None, (s, e)
    return Transition(s, e, "dissolve"), (s, e)


def _fade(thumbs, frames, b0: int, b1: int, k: int, max_len: int, cuts: list[int], st: Settings) -> Transition:
    """The fade around the black frames [b0, b1): from the first frame the fade out darkens to
    the last the fade in has not fully lit. A side with no steady ramp (a cut to or from black,
    the file's start or end) starts or ends at the black frames."""
    start = _fade_side(thumbs, frames, b0, -1, k, max_len, cuts, st) if b0 > 0 else None
    end = _fade_side(thumbs, frames, b1 - 1, 1, k, max_len, cuts, st) if b1 < len(frames) else None
    return Transition(b0 if start is None else start, b1 if end is None else end, "fade")


def _fade_side(thumbs, frames, black: int, step: int, k: int, max_len: int, cuts: list[int], st: Settings) -> int | None:
    """The first frame the fade out into black frame ``black`` darkens (``step`` -1), or one past
    the last frame the fade in from it has not fully lit (``step`` 1); None without a steady ramp.
    The window grows from 2k frames until the ramp has k clean frames beyond it, so whatever
    follows (a dissolve a few seconds on) does not bend the fit."""
    n = len(frames)
    for w in range(2 * k, max_len + 2 * k + 1, k):
        if step < 0:
            x, y = _bounds(max(0, black - w), black, cuts, (black - 1, black))
            edge = x == 0 or x in cuts or x == black - max_len - 2 * k
        else:
            x, y = _bounds(black, min(n - 1, black + w), cuts, (black, black + 1))
            edge = y == n - 1 or y + 1 in cuts or y == black + max_len + 2 * k
        if y - x < st.min_frames + 1:
            return None
        s, e = _fit(frames, x, y, st.min_frames)
        if step < 0:
            ok = e >= black - 2 and _mix_ok(thumbs, frames, s, e, x, black, k, st, pictures=(True, False))
            if ok and (s - 1 - x >= k or edge):
                return s
        else:
            ok = s <= black + 3 and _mix_ok(thumbs, frames, s, e, black, y, k, st, pictures=(False, True))
            if ok and (y - e >= k or edge):
                return e
        if edge:
            return None
    return None


# ---------------------------------------------------------------------------------------------
# helpers


def hist_distance(a: np.ndarray, b: np.ndarray, bins: int = 16) -> float:
    """Mean Bhattacharyya distance (0 same, 1 disjoint) of the Y, U and V histograms of two
    BGR images [h, w, 3] uint8."""
    import cv2

    ya, yb = cv2.cvtColor(a, cv2.COLOR_BGR2YUV), cv2.cvtColor(b, cv2.COLOR_BGR2YUV)
    out = 0.0
    for c in range(3):
        ha = cv2.calcHist([ya], [c], None, [bins], [0, 256])
        hb = cv2.calcHist([yb], [c], None, [bins], [0, 256])
        out += cv2.compareHist(ha, hb, cv2.HISTCMP_BHATTACHARYYA)
    return out / 3


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in ``mask``."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _bump(far: np.ndarray, taken: np.ndarray, peak: int, floor: float) -> tuple[int, int]:
    """The frames around ``peak`` where ``far`` stays at or above ``floor`` (and not taken)."""
    r0, r1 = peak, peak + 1
    while r0 > 0 and far[r0 - 1] >= floor and not taken[r0 - 1]:
        r0 -= 1
    while r1 < len(far) and far[r1] >= floor and not taken[r1]:
        r1 += 1
    return r0, r1


def _disjoint(found: list[Transition]) -> list[Transition]:
    """Sorted; overlapping or touching transitions merged (a fade wins the kind)."""
    out: list[Transition] = []
    for t in sorted(found, key=lambda t: (t.start, t.end)):
        if out and t.start <= out[-1].end:
            last = out[-1]
            kind = "fade" if "fade" in (last.kind, t.kind) else last.kind
            out[-1] = Transition(last.start, max(last.end, t.end), kind)
        else:
            out.append(t)
    return out
