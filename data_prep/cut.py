"""cut: clips inside shots, resampled to the target fps, rotated, resized and centre-cropped to an
aspect-ratio bucket, written as constant-frame-rate H.264 MP4 so any later reader is frame-exact.

Resampling picks, for output frame j, the source frame whose presentation time is nearest to
``start + j / fps``. Only frames of the clip's own shot are candidates, so a clip never crosses a cut.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from data_prep.probe import ProbeResult
from data_prep.split import ShotList
from finetune.video import Mp4Writer

# Timestamps are stored rounded to 1 us; compare with a margin well above that, far below a frame.
_EPS = 1e-4


@dataclass
class ClipPlan:
    """One clip to write. ``indices``: the source frame for each output frame (len == frames)."""

    name: str
    source: str
    shot: int
    start_frame: int
    end_frame: int  # exclusive
    start_time: float
    end_time: float  # start_time + frames / fps
    frames: int
    fps: float
    width: int
    height: int
    indices: list[int] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TooShort:
    source: str
    shot: int
    seconds: float
    needed: float


def source_key(source: str | Path, root: str | Path) -> str:
    """A short, stable, filesystem-safe name for a source: its stem plus a hash of its path
    relative to the footage folder (two files called a.mp4 in different folders stay apart)."""
    source, root = Path(source), Path(root)
    try:
        rel = source.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = source.resolve().as_posix()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in source.stem)[:40] or "video"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:6]}"


def choose_bucket(display_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to the source's; ties go to the first."""
    w, h = display_size
    ar = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ar))


def clip_starts(t_first: float, t_last: float, duration: float, mode: str, per_shot: int, stride_s: float) -> list[float]:
    """Start times of clips lasting ``duration`` s (first to last frame) inside [t_first, t_last]."""
    room = t_last - t_first - duration
    if room < -_EPS:
        return []
    room = max(room, 0.0)
    if mode == "head":
        return [t_first]
    if mode == "uniform":
        if per_shot == 1:
            return [t_first + room / 2]
        return [t_first + room * k / (per_shot - 1) for k in range(per_shot)]
    if mode == "sliding":
        n = int(math.floor(room / stride_s + _EPS)) + 1
        return [t_first + k * stride_s for k in range(n)]
    raise ValueError(f"mode={mode!r} must be head, uniform or sliding")


def plan_clips(
    shots: ShotList,
    probe: ProbeResult,
    key: str,
    frames: int,
    fps: float,
    buckets: list[tuple[int, int]],
    mode: str = "head",
    clips_per_shot: int = 3,
    stride: int | None = None,
) -> tuple[list[ClipPlan], list[TooShort]]:
    """Clips for every shot of one source, and the shots too short for even one clip."""
    times = shots.frame_times
    width, height = choose_bucket(probe.display_size, buckets)
    duration = (frames - 1) / fps
    stride_s = (stride or frames) / fps
    plans, short = [], []
    for shot in shots.shots:
        a, b = shot.start_frame, shot.end_frame
        starts = clip_starts(times[a], times[b - 1], duration, mode, clips_per_shot, stride_s)
        if not starts:
            short.append(TooShort(shots.source, shot.index, shot.end_time - shot.start_time, frames / fps))
        seen = set()
        for t0 in starts:
            idx = [_nearest(times, a, b, t0 + j / fps) for j in range(frames)]
            if idx[0] in seen:  # uniform on a shot barely long enough: same clip twice
                continue
            seen.add(idx[0])
            plans.append(
                ClipPlan(
                    name=f"{key}_s{shot.index:03d}_f{idx[0]:06d}.mp4",
                    source=shots.source,
                    shot=shot.index,
                    start_frame=idx[0],
                    end_frame=idx[-1] + 1,
                    start_time=round(times[idx[0]], 6),
                    end_time=round(times[idx[0]] + frames / fps, 6),
                    frames=frames,
                    fps=fps,
                    width=width,
                    height=height,
                    indices=idx,
                )
            )
    return plans, short


def _nearest(times: list[float], lo: int, hi: int, t: float) -> int:
    """Index in [lo, hi) whose time is nearest to t (ties to the earlier frame)."""
    i = bisect.bisect_left(times, t - _EPS, lo, hi)
    if i >= hi:
        return hi - 1
    if i > lo and (t - times[i - 1]) <= (times[i] - t) + _EPS:
        return i - 1
    return i


# ---------------------------------------------------------------------------------------------
# writing


def cover_size(src_w: int, src_h: int, out_w: int, out_h: int) -> tuple[int, int]:
    """Smallest size with the source's aspect ratio that covers (out_w, out_h)."""
    scale = max(out_w / src_w, out_h / src_h)
    return max(out_w, math.ceil(src_w * scale - 1e-9)), max(out_h, math.ceil(src_h * scale - 1e-9))


def _cover_coded(frame: av.VideoFrame, rotation: int, out_w: int, out_h: int, even: bool = False) -> tuple[int, int, int]:
    """(quarter turns, coded width, coded height) to scale the frame to before rotating and cropping."""
    quarter = (rotation // 90) % 4
    disp_w, disp_h = (frame.height, frame.width) if quarter % 2 else (frame.width, frame.height)
    cw, ch = cover_size(disp_w, disp_h, out_w, out_h)
    if even:  # yuv420p planes: chroma is half size, so crop offsets and sizes stay even
        cw, ch = cw + cw % 2, ch + ch % 2
    return (quarter, ch, cw) if quarter % 2 else (quarter, cw, ch)


def frame_to_rgb(frame: av.VideoFrame, rotation: int, out_w: int, out_h: int, reformatter=None) -> np.ndarray:
    """Decoded frame -> rotated, resized, centre-cropped RGB [out_h, out_w, 3] uint8.

    Scaling happens in swscale on the coded frame (before the rotation) so only the small image is
    rotated; ``rotation`` is counter-clockwise, as PyAV's ``VideoFrame.rotation`` reports it.
    """
    quarter, coded_w, coded_h = _cover_coded(frame, rotation, out_w, out_h)
    if reformatter is None:
        img = frame.to_ndarray(format="rgb24", width=coded_w, height=coded_h, interpolation="AREA")
    else:
        img = reformatter.reformat(frame, coded_w, coded_h, "rgb24", interpolation="AREA").to_ndarray()
    if quarter:
        img = np.rot90(img, quarter)
    y0, x0 = (img.shape[0] - out_h) // 2, (img.shape[1] - out_w) // 2
    return np.ascontiguousarray(img[y0 : y0 + out_h, x0 : x0 + out_w])


def frame_to_yuv(frame: av.VideoFrame, rotation: int, out_w: int, out_h: int, reformatter) -> av.VideoFrame:
    """As :func:`frame_to_rgb`, but kept in yuv420p from decoder to encoder: swscale scales and
    converts once, numpy rotates and crops the three planes (Y [h, w], U and V [h/2, w/2]), and
    x264 takes the frame as it is. ``out_w`` and ``out_h`` must be even; the crop is centred to
    the nearest even pixel. ``reformatter``: an av VideoReformatter kept for the whole file."""
    quarter, coded_w, coded_h = _cover_coded(frame, rotation, out_w, out_h, even=True)
    small = reformatter.reformat(frame, coded_w, coded_h, "yuv420p", interpolation="AREA")
    planes = [
        np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in small.planes
    ]
    if quarter:
        planes = [np.rot90(p, quarter) for p in planes]
    y0, x0 = (planes[0].shape[0] - out_h) // 4 * 2, (planes[0].shape[1] - out_w) // 4 * 2
    y = planes[0][y0 : y0 + out_h, x0 : x0 + out_w]
    u, v = (p[y0 // 2 : (y0 + out_h) // 2, x0 // 2 : (x0 + out_w) // 2] for p in planes[1:])
    packed = np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(out_h * 3 // 2, out_w)
    return av.VideoFrame.from_ndarray(packed, format="yuv420p")


class ClipWriter(Mp4Writer):
    """The encoder of one planned clip, keeping a few sampled frames (RGB) for the filter step."""

    def __init__(self, path: Path, plan: ClipPlan, crf: int, preset: str):
        super().__init__(path, plan.fps, plan.width, plan.height, crf=crf, preset=preset)
        self.samples: list[np.ndarray] = []
        self.sample_at = set(sample_positions(plan.frames))
        self.to_rgb = VideoReformatter()

    def add_frame(self, frame: av.VideoFrame) -> None:
        if self.frames_written in self.sample_at:
            self.samples.append(self.to_rgb.reformat(frame, format="rgb24").to_ndarray())
        super().add_frame(frame)


def sample_positions(frames: int, k: int = 5) -> list[int]:
    """k frame positions spread over a clip, first and last included."""
    if frames <= k:
        return list(range(frames))
    return sorted({round(i * (frames - 1) / (k - 1)) for i in range(k)})


def write_clips(probe: ProbeResult, plans: list[ClipPlan], clip_dir: Path, crf: int = 18, preset: str = "veryfast", on_done=None) -> dict[str, list[np.ndarray]]:
    """Decode the source once and write every planned clip of it.

    Returns, per clip name, RGB samples [H, W, 3] at ``sample_positions`` (for filtering). Calls
    ``on_done(plan)`` after each clip is safely on disk. Raises av.FFmpegError if the source cannot
    be decoded as far as the plans need (open writers are removed first).
    """
    if not plans:
        return {}
    clip_dir.mkdir(parents=True, exist_ok=True)
    need: dict[int, list[ClipPlan]] = {}
    for p in plans:
        for i in p.indices:
            need.setdefault(i, []).append(p)
    last_needed = max(need)
    remaining = {p.name: p.frames for p in plans}
    writers: dict[str, ClipWriter] = {}
    samples: dict[str, list[np.ndarray]] = {}
    reformatter = VideoReformatter()
    try:
        with av.open(probe.path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in need:
                    _feed(frame, probe.rotation, need[i], i, writers, remaining, samples, clip_dir, crf, preset, on_done, reformatter)
                if i >= last_needed:
                    break
        if remaining and any(v > 0 for v in remaining.values()):
            missing = [n for n, v in remaining.items() if v > 0]
            raise av.InvalidDataError(0, f"source ended before {len(missing)} clip(s) were complete: {missing[:3]}")
    finally:
        for w in writers.values():
            w.abort()
    return samples


def _feed(frame, rotation, plans, i, writers, remaining, samples, clip_dir, crf, preset, on_done, reformatter) -> None:
    converted: dict[tuple[int, int], av.VideoFrame] = {}
    for p in plans:
        size = (p.width, p.height)
        if size not in converted:
            converted[size] = frame_to_yuv(frame, rotation, *size, reformatter)
        w = writers.get(p.name)
        if w is None:
            w = writers[p.name] = ClipWriter(clip_dir / p.name, p, crf, preset)
        # a source frame can repeat inside a clip when the clip fps is above the source's
        for _ in range(p.indices.count(i)):
            w.add_frame(converted[size])
            remaining[p.name] -= 1
        if remaining[p.name] == 0:
            w.close()
            del writers[p.name]
            samples[p.name] = w.samples
            if on_done:
                on_done(p)
