"""split: shot boundaries with PySceneDetect's detectors, fed frames decoded by PyAV.

Frame numbers here (and everywhere in data_prep) are the index of a frame in PyAV's decode
output, counted from the first decoded frame. We feed the detectors ourselves rather than use
``scenedetect.detect()`` because its frame numbers come from timestamps, which are off on MPEG-PS
files that start at an offset and can differ by one on AVI/MPEG; cut then indexes the very same
decode order, so a shot boundary and a clip boundary always agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import av

from data_prep.probe import ProbeResult

# As PySceneDetect's SceneManager does: detect on frames about 256 px wide (speed; the detectors'
# thresholds are tuned for it), area-averaged. swscale does the resize during the colour conversion,
# which saves converting full-size frames; the sample videos' cuts are unchanged by it.
_DETECT_WIDTH = 256


@dataclass
class Shot:
    index: int
    start_frame: int  # first frame of the shot
    end_frame: int  # one past its last frame
    start_time: float  # seconds from the first frame
    end_time: float  # end of the shot's last frame


@dataclass
class ShotList:
    """Shots of one source plus the presentation time of every decoded frame (seconds from the
    first frame; cut resamples with them, so variable frame rates keep their real speed)."""

    source: str
    detector: str
    threshold: float
    min_shot_len: int
    frames: int
    fps: float
    shots: list[Shot]
    frame_times: list[float] = field(repr=False)
    decode_error: str = ""

    @property
    def cuts(self) -> list[int]:
        return [s.start_frame for s in self.shots[1:]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShotList":
        d = dict(d)
        d["shots"] = [Shot(**s) for s in d["shots"]]
        return cls(**d)


def default_threshold(detector: str) -> float:
    return {"adaptive": 3.0, "content": 27.0}[detector]


def make_detector(detector: str, threshold: float, min_shot_len: int):
    from scenedetect import AdaptiveDetector, ContentDetector

    if detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_shot_len)
    if detector == "content":
        return ContentDetector(threshold=threshold, min_scene_len=min_shot_len)
    raise ValueError(f"detector={detector!r} must be 'adaptive' or 'content'")


def detect_shots(
    probe: ProbeResult, detector: str = "adaptive", threshold: float | None = None, min_shot_len: int = 15
) -> ShotList:
    """Decode ``probe.path`` once and split it into shots.

    A decode error part-way (a truncated file) ends the scan; the frames before it are kept and
    ``decode_error`` says what happened.
    """
    from scenedetect import FrameTimecode
    from scenedetect.scene_manager import compute_downscale_factor

    threshold = default_threshold(detector) if threshold is None else threshold
    det = make_detector(detector, threshold, min_shot_len)
    rate = probe.fps or 25.0
    cuts: list[int] = []
    times: list[float] = []
    error = ""
    with av.open(probe.path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                t0 = t if t0 is None else t0
                times.append(round(t - t0, 6))
                factor = compute_downscale_factor(frame.width, _DETECT_WIDTH)
                w, h = frame.width, frame.height
                if factor > 1:
                    w, h = max(1, round(w / factor)), max(1, round(h / factor))
                img = frame.to_ndarray(format="bgr24", width=w, height=h, interpolation="AREA")
                cuts += [tc.frame_num for tc in det.process_frame(FrameTimecode(i, rate), img)]
        except av.FFmpegError as err:
            error = f"decoding stopped after {len(times)} frames: {err}"
    n = len(times)
    cuts += [tc.frame_num for tc in det.post_process(FrameTimecode(n, rate))]
    times = _monotonic(times, rate)
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < n) + [n]
    step = (times[-1] - times[-2]) if n > 1 else 1.0 / rate
    shots = [
        Shot(k, a, b, times[a], times[b] if b < n else times[-1] + step)
        for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
        if b > a
    ]
    return ShotList(probe.path, detector, threshold, min_shot_len, n, probe.fps, shots, times, error)


def _monotonic(times: list[float], rate: float) -> list[float]:
    """Frame times forced strictly increasing (broken timestamps happen; fall back to 1/rate steps)."""
    out: list[float] = []
    for t in times:
        out.append(t if not out or t > out[-1] else out[-1] + 1.0 / rate)
    return out
