"""Generators for the data_prep tests: a corpus of good and bad inputs, small (64x48, < 2 s) and built
with PyAV in code. The one exception is Theora: PyAV ships no Theora encoder, so that file is made
with the ffmpeg binary inside the imageio-ffmpeg wheel (a pip dependency, so CI has it too)."""

from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

ASSETS = Path(__file__).parent / "assets"
SYNTH = ASSETS / "synth_lavfi.mp4"
SYNTH_CUTS = [60, 110, 155, 210, 250, 315]
SYNTH_FRAMES = 365

W, H = 64, 48


def texture_frame(i: int, w: int = W, h: int = H, seed: int = 0, shift: int = 1) -> np.ndarray:
    """A sharp, bright, moving frame [h, w, 3] uint8: a seeded random texture rolled ``shift`` px per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 255, size=(h // 8 + 1, w // 2 + 1, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(base, 8, axis=0), 8, axis=1)[:h, : w * 4]
    x = (i * shift) % (w * 3)
    return np.ascontiguousarray(base[:, x : x + w])


def write_video(
    path: Path,
    n: int,
    fps: int = 16,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    size: tuple[int, int] = (W, H),
    rotation: int = 0,
    pts_ms: list[int] | None = None,
    frame_fn=None,
    fmt: str | None = None,
    start_pts: int = 0,
) -> Path:
    """Write ``n`` frames. ``pts_ms`` gives explicit millisecond timestamps (variable frame rate)."""
    w, h = size
    seed = sum(path.name.encode())  # every file its own texture, so none is a duplicate of another
    frame_fn = frame_fn or (lambda i: texture_frame(i, w, h, seed=seed))
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            s.set_display_rotation(rotation)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frame_fn(i), format="rgb24")
            f.pts = pts_ms[i] if pts_ms is not None else start_pts + i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        t = np.arange(16000 // 2) / 16000
        samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = 0
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def write_unknown_codec(path: Path) -> Path:
    """An MP4 whose video sample entry names a codec nobody has ('zzz1' in place of 'avc1'): FFmpeg
    demuxes its packets but has no decoder for them."""
    full = write_video(path.with_name("_avc1.mp4"), 24)
    data = full.read_bytes()
    full.unlink()
    assert data.count(b"avc1") >= 1
    path.write_bytes(data.replace(b"avc1", b"zzz1"))
    return path


def write_theora(path: Path, seconds: float = 1.5) -> Path:
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    cmd = [exe, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=16:duration={seconds}"]
    subprocess.run(cmd + ["-c:v", "libtheora", "-q:v", "7", str(path)], check=True)
    return path


def cut_frame(cut: int):
    """frame_fn with a hard cut at frame ``cut``: the texture, then its photographic negative."""
    return lambda i: texture_frame(i) if i < cut else 255 - texture_frame(i, seed=7)


# Bad inputs and the words their reason must contain.
BAD = {
    "zero.mp4": "zero-byte",
    "truncated.mp4": "truncated",
    "notes.mp4": "not a readable media file",
    "audio_only.mp4": "no video stream",
    "unknown_codec.mp4": "unsupported codec: no decoder",
}
# Files that open but are too short for one clip of the corpus settings.
TOO_SHORT = {"one_frame.mp4": "too short"}
GOOD = [
    "plain.mp4",
    "portrait_rot90.mp4",
    "vfr.mp4",
    "tenbit.mp4",
    "theora.ogv",
    "mpegps_offset.mpg",
]
# The MPEG-PS file has a hard cut here (a decord trap: its stream does not start at 0).
MPEGPS_CUT = 20


def build_corpus(root: Path) -> Path:
    """A folder with every good and bad file above (plus a caption sidecar for plain.mp4)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero.mp4").write_bytes(b"")
    full = write_video(root / "_full.mp4", 24)
    data = full.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    full.unlink()
    (root / "notes.mp4").write_text("these are my notes, not a video\n" * 20)
    write_audio_only(root / "audio_only.mp4")
    write_unknown_codec(root / "unknown_codec.mp4")
    write_video(root / "one_frame.mp4", 1)
    write_video(root / "plain.mp4", 24)
    (root / "plain.txt").write_text("a textured wall sliding left")
    write_video(root / "portrait_rot90.mp4", 24, rotation=90)
    pts, t = [], 0
    for i in range(30):
        pts.append(t)
        t += 40 if i % 2 else 80
    write_video(root / "vfr.mp4", 30, pts_ms=pts)
    write_video(root / "tenbit.mp4", 24, pix_fmt="yuv420p10le")
    write_theora(root / "theora.ogv")
    write_video(
        root / "mpegps_offset.mpg", 40, fps=25, codec="mpeg2video", fmt="mpeg", start_pts=12,
        frame_fn=cut_frame(MPEGPS_CUT),
    )
    return root


def copy_synth(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(SYNTH, dst / SYNTH.name)
    return dst


# Gradual transitions between two real sample clips (2 s each at 24 fps, 160x90): the frames
# [start, end) of the transition in the output file.
TRANSITIONS = {"dissolve.mp4": (36, 48), "fade_black.mp4": (36, 60)}


def write_transition(path: Path, kind: str) -> Path:
    """Big Buck Bunny (2 s) then the rocket launch (2 s) joined by an ffmpeg ``xfade`` dissolve of
    12 frames starting at frame 36 ("dissolve"), or by ``fade`` out to black over frames 36-47 and
    in from black over 48-59 ("fade"). Made with the imageio-ffmpeg binary."""
    import imageio_ffmpeg

    prep = "fps=24,scale=160:90,setsar=1,trim=end_frame=48,setpts=PTS-STARTPTS"
    if kind == "dissolve":
        graph = f"[0:v]{prep}[a];[1:v]{prep}[b];[a][b]xfade=transition=fade:duration=0.5:offset=1.5,format=yuv420p"
    elif kind == "fade":
        graph = f"[0:v]{prep},fade=t=out:s=36:n=12[a];[1:v]{prep},fade=t=in:s=0:n=12[b];[a][b]concat=n=2:v=1,format=yuv420p"
    else:
        raise ValueError(f"kind={kind!r} must be 'dissolve' or 'fade'")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(ASSETS / "bigbuckbunny.mp4"),
           "-i", str(ASSETS / "oa4_launch.webm"), "-filter_complex", graph, "-c:v", "libx264", "-crf", "18", str(path)]  # fmt: skip
    subprocess.run(cmd, check=True)
    return path
