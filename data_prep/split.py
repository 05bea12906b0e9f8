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

# Detect on frames about 128 px wide (PySceneDetect's SceneManager uses 256; at 128 the detectors
# do a quarter of the work and every sample video's cuts are the same). swscale does the resize
# during the colour conversion, which saves converting full-size frames. Its area filter costs
# 0.29 ms of CPU a 720p frame (bilinear 0.35, point 0.11) with the same cuts in every sample;
# point sampling aliases (the content detector then finds a false cut in the synthetic sample's
# Game of Life). One VideoReformatter per file keeps swscale's context between frames
# (VideoFrame.to_ndarray with a size builds a new one per frame, which cost as much as decoding).
_DETECT_WIDTH = 128
_DETECT_INTERP = "AREA"
# Bumped when detection changes what it finds, so datasets split by an older version re-split.
SPLIT_VERSION = 3


def detect_size(width: int, height: int) -> tuple[int, int]:
    """The size frames are converted to for detection (PySceneDetect's downscale rule)."""
    from scenedetect.scene_manager import compute_downscale_factor

    factor = compute_downscale_factor(width, _DETECT_WIDTH)
    if factor > 1:
        return max(1, round(width / factor)), max(1, round(height / factor))
    return width, height


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
    transitions: list[tuple[int, int]] = field(default_factory=list)  # fades, dissolves: [start, end)
    transition_kinds: list[str] = field(default_factory=list)  # "dissolve" or "fade", one per transition

    @property
    def cuts(self) -> list[int]:
        """First frame of every shot after the first (after a hard cut or a transition)."""
        return [s.start_frame for s in self.shots[1:]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShotList":
        d = dict(d)
        d["shots"] = [Shot(**s) for s in d["shots"]]
        d["transitions"] = [tuple(t) for t in d.get("transitions", [])]
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


def shot_ranges(n: int, cuts: list[int], transitions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Frames [0, n) split at the hard ``cuts`` with the ``transitions`` ranges left out: the
    [start, end) range of every shot, in order."""
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < n) + [n]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        for ta, tb in transitions:
            if ta <= a < tb:
                a = tb
            if a < ta < b:
                out.append((a, ta))
                a = min(b, tb)
        if b > a:
            out.append((a, b))
    return out


def detect_shots(
    probe: ProbeResult,
    detector: str = "adaptive",
    threshold: float | None = None,
    min_shot_len: int = 15,
    transitions: bool = True,
    threads: int = 0,
) -> ShotList:
    """Decode ``probe.path`` once and split it into shots; with ``transitions``, fades and dissolves
    (:func:`data_prep.transitions.find_transitions`, on a 32 px thumbnail of every frame) are
    boundaries too and their frames belong to no shot.

    A decode error part-way (a truncated file) ends the scan; the frames before it are kept and
    ``decode_error`` says what happened. ``threads``: decoder threads (0: FFmpeg's choice; with as
    many files decoded at once as there are cores, 1 each saves the threads' overhead, 8% of CPU).
    """
    import cv2
    import numpy as np
    from av.video.reformatter import VideoReformatter
    from scenedetect import FrameTimecode

    from data_prep.transitions import THUMB_WIDTH, find_transitions

    threshold = default_threshold(detector) if threshold is None else threshold
    det = make_detector(detector, threshold, min_shot_len)
    rate = probe.fps or 25.0
    cuts: list[int] = []
    times: list[float] = []
    thumbs: list[np.ndarray] = []
    error = ""
    with av.open(probe.path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        # Detection looks at 128 px frames: the decoder's deblocking filter changes nothing it can
        # see there, and skipping it saves a fifth of the decode (H.264, VP8/9).
        stream.codec_context.options["skip_loop_filter"] = "all"
        t0 = None
        reformatter = VideoReformatter()
        size = None
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                t0 = t if t0 is None else t0
                times.append(round(t - t0, 6))
                if size is None:  # from the first frame: a stream that changes size mid-way is scaled to it
                    w, h = detect_size(frame.width, frame.height)
                    size = (w, h, (THUMB_WIDTH, max(1, round(THUMB_WIDTH * h / w))))
                w, h, thumb_size = size
                img = reformatter.reformat(frame, w, h, "bgr24", interpolation=_DETECT_INTERP).to_ndarray()
                cuts += [c.frame_num for c in det.process_frame(FrameTimecode(i, rate), img)]
                if transitions:
                    thumbs.append(cv2.resize(img, thumb_size, interpolation=cv2.INTER_AREA))
        except av.FFmpegError as err:
            error = f"decoding stopped after {len(times)} frames: {err}"
    n = len(times)
    cuts += [tc.frame_num for tc in det.post_process(FrameTimecode(n, rate))]
    found = find_transitions(np.stack(thumbs), rate, cuts) if thumbs and len(thumbs) == n else []
    times = _monotonic(times, rate)
    step = (times[-1] - times[-2]) if n > 1 else 1.0 / rate
    spans = [(t.start, t.end) for t in found]
    shots = [
        Shot(k, a, b, times[a], times[b] if b < n else times[-1] + step)
        for k, (a, b) in enumerate(shot_ranges(n, cuts, spans))
    ]
    return ShotList(probe.path, detector, threshold, min_shot_len, n, probe.fps, shots, times, error, spans,
                    [t.kind for t in found])


def _monotonic(times: list[float], rate: float) -> list[float]:
    """Frame times forced strictly increasing (broken timestamps happen; fall back to 1/rate steps)."""
    out: list[float] = []
    for t in times:
        out.append(t if not out or t > out[-1] else out[-1] + 1.0 / rate)
    return out
