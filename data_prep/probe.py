"""probe: open a video file with PyAV and record what later steps need, or why it cannot be used.

Nothing here imports torch or the model families, so probing a folder is quick.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av

# Files the folder walk picks up. Anything else (sidecar .txt captions, images) is ignored.
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .ogv .ogg .flv .wmv .3gp".split()
)
# A stream whose frame intervals spread more than this (relative to the median) is variable-rate.
_VFR_TOLERANCE = 0.1
# decord reads these containers frame-exactly when the stream starts at 0 (see tests/assets/ATTRIBUTION.md).
_DECORD_EXACT_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"}


@dataclass
class ProbeResult:
    """What one file holds. ``ok`` is False when the file cannot be used; ``reason`` says why.

    ``frames`` counts video packets (one per frame), ``times`` is not stored; ``rotation`` is the
    counter-clockwise display rotation in degrees (0, 90, 180, 270) that must be applied to decoded
    frames; ``width``/``height`` are the coded size before rotation.
    """

    path: str
    ok: bool
    reason: str = ""
    size_bytes: int = 0
    mtime: float = 0.0
    container: str = ""
    codec: str = ""
    pix_fmt: str = ""
    width: int = 0
    height: int = 0
    rotation: int = 0
    fps: float = 0.0
    frames: int = 0
    duration: float = 0.0
    start_time: float = 0.0
    vfr: bool = False
    bit_depth: int = 8
    decord_exact: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown, after rotation."""
        return (self.height, self.width) if self.rotation in (90, 270) else (self.width, self.height)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProbeResult":
        return cls(**d)


def list_videos(folder: Path) -> list[Path]:
    """Video files under ``folder`` (recursive, sorted), by extension. Hidden files are skipped."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not any(s.startswith(".") for s in p.parts[-1:])
    )


def _bad(path: Path, reason: str, st: os.stat_result | None) -> ProbeResult:
    return ProbeResult(
        path=str(path),
        ok=False,
        reason=reason,
        size_bytes=st.st_size if st else 0,
        mtime=st.st_mtime if st else 0.0,
    )


def _looks_like_mp4(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(12)
    return head[4:8] in (b"ftyp", b"mdat", b"moov", b"free", b"wide")


def _open_reason(path: Path, err: Exception) -> str:
    """Turn a PyAV open error into a reason a person understands."""
    msg = getattr(err, "strerror", None) or str(err)
    if _looks_like_mp4(path):
        return f"truncated or damaged MP4/MOV: its index is missing ({msg}); re-export or re-copy it"
    return f"not a readable media file ({msg})"


def probe_file(path: str | Path) -> ProbeResult:
    """Probe one file. Never raises for a bad file: the result has ``ok=False`` and a ``reason``.

    Reads every video packet (no decoding) to count frames and spot a variable frame rate, then
    decodes the first frame (to prove the codec works and to read the rotation) and the last
    packets (to catch truncation).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as err:
        return _bad(path, f"cannot stat: {err}", None)
    if st.st_size == 0:
        return _bad(path, "zero-byte file", st)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        return _bad(path, _open_reason(path, err), st)
    try:
        return _probe_container(path, container, st)
    finally:
        container.close()


def _probe_container(path: Path, container, st: os.stat_result) -> ProbeResult:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        return _bad(path, f"no video stream (has {', '.join(kinds)})", st)
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:  # demuxed, but FFmpeg knows no decoder for it: no size, no frames
        return _bad(
            path,
            f"unsupported codec: no decoder for its video stream ({container.format.name} container); "
            f"convert it, e.g. ffmpeg -i {path.name} -c:v libx264 {path.stem}_h264.mp4",
            st,
        )
    codec = ctx.name
    res = ProbeResult(
        path=str(path),
        ok=True,
        size_bytes=st.st_size,
        mtime=st.st_mtime,
        container=container.format.name,
        codec=codec,
        pix_fmt=(ctx.pix_fmt or "") if ctx is not None else "",
        width=stream.width,
        height=stream.height,
    )
    tb = stream.time_base or Fraction(1, 1)
    start = stream.start_time if stream.start_time is not None else 0
    res.start_time = float(start * tb)
    pts, n_packets, declared = _scan_packets(container, stream)
    res.frames = n_packets
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    first, reason = _first_frame(path, stream.index)
    if reason:
        return _bad(path, reason, st)
    res.rotation = int(first.rotation or 0) % 360
    res.pix_fmt = first.format.name
    res.bit_depth = 10 if any(t in res.pix_fmt for t in ("10", "12")) else 8
    if len(pts) >= 2:
        diffs = [b - a for a, b in zip(pts, pts[1:]) if b > a]
        if diffs:
            med = sorted(diffs)[len(diffs) // 2]
            res.vfr = any(abs(d - med) > _VFR_TOLERANCE * med for d in diffs)
            res.duration = float((pts[-1] - pts[0] + med) * tb)
            if rate is None or res.vfr:
                rate = Fraction(len(pts) - 1, 1) / ((pts[-1] - pts[0]) * tb)
    res.fps = float(rate) if rate else 0.0
    if res.duration == 0.0 and res.fps:
        res.duration = res.frames / res.fps
    if n_packets == 0:
        return _bad(path, "no video frames (empty stream)", st)
    if declared and res.frames < 0.9 * declared:
        res.notes.append(f"header says {declared} frames, found {res.frames}: the file may be truncated")
    res.decord_exact = (
        res.container in _DECORD_EXACT_FORMATS and res.start_time == 0.0 and not res.vfr and codec != "theora"
    )
    return res


def _scan_packets(container, stream) -> tuple[list[int], int, int]:
    """Sorted presentation timestamps of the video packets, their count, and the declared count."""
    pts: list[int] = []
    n = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            n += 1
            if packet.pts is not None:
                pts.append(packet.pts)
    except av.FFmpegError:
        pass  # a truncated tail: keep what was read; the decode check below decides
    return sorted(pts), n, int(stream.frames or 0)


def _first_frame(path: Path, index: int):
    """Decode the first frame in a fresh container. Returns (frame, "") or (None, reason)."""
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            s = c.streams[index]
            if s.codec_context is None:
                return None, f"unsupported codec (no decoder for {s.codec.name if s.codec else 'this stream'})"
            for frame in c.decode(s):
                return frame, ""
    except av.FFmpegError as err:
        return None, f"cannot decode video ({type(err).__name__}: {err}); the file is truncated or the codec is unsupported"
    return None, "video stream has no decodable frames (truncated?)"


def probe_all(paths: list[Path], progress: bool = True) -> list[ProbeResult]:
    """Probe every file; bad files come back with ``ok=False`` rather than raising."""
    from tqdm.auto import tqdm

    return [probe_file(p) for p in tqdm(paths, desc="probe", unit="file", disable=not progress)]
