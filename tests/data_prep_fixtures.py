"""Generators for the data_prep tests: a corpus of good and bad inputs, small (64x48, < 2 s) and built
with PyAV in code. The one exception is Theora: PyAV ships no Theora encoder, so that file is made
with the ffmpeg binary inside the imageio-ffmpeg wheel (a pip dependency, so CI has it too)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# Footage with gradual transitions at frames known exactly: real sample shots joined with ffmpeg's
# xfade (cross-dissolves) and fade (to black and back) filters, and the same edit made of solid
# colours, whose frames say exactly which frames mix two shots.

COMPOSE_FPS = 24
COMPOSE_SIZE = (320, 180)
# Shots of the sample videos: (file in tests/assets, first frame, frames available at 24 fps).
SHOTS = {
    "bunny": ("bigbuckbunny.mp4", 0, 126),
    "pad": ("oa4_launch.webm", 0, 74),
    "rocket": ("oa4_launch.webm", 74, 120),
    "city": ("city_cc0.mp4", 0, 111),
    "towers": ("city_cc0.mp4", 116, 70),
}
_COLOURS = ["0xC83C28", "0x28B45A", "0x3250DC", "0xDCC832", "0xB432C8", "0x32C8C8"]


def _segment(i: int, shot: str, n: int, colour: str | None) -> str:
    """Filter chain making input ``i`` into ``n`` frames of ``shot`` (or of a solid colour)."""
    w, h = COMPOSE_SIZE
    if colour is not None:
        return f"color=c={colour}:s={w}x{h}:r={COMPOSE_FPS},trim=end_frame={n},setpts=PTS-STARTPTS,settb=1/{COMPOSE_FPS},format=yuv444p"
    first = SHOTS[shot][1]
    # fps first: 25 fps sources are resampled before the frames are counted
    return (f"[{i}:v]fps={COMPOSE_FPS},trim=start_frame={first}:end_frame={first + n},setpts=PTS-STARTPTS,"
            f"settb=1/{COMPOSE_FPS},scale={w}:{h},setsar=1,format=yuv444p")


def compose_graph(parts: list, solid: bool = False) -> tuple[str, list[str]]:
    """An ffmpeg filter graph for ``parts``: ``[(shot, frames), join, (shot, frames), join, ...]``
    where a join is ``("cut",)``, ``("dissolve", L)`` (xfade over L frames, the two shots
    overlapping by L) or ``("fade", out, black, in)`` (fade to black over ``out`` frames,
    ``black`` frames of black, fade in over ``in``). Returns (graph, input files)."""
    shots = parts[0::2]
    joins = parts[1::2]
    files = sorted({SHOTS[s][0] for s, _ in shots})
    chains = [_segment(files.index(SHOTS[s][0]), s, n, _COLOURS[k] if solid else None) + f"[s{k}]"
              for k, (s, n) in enumerate(shots)]
    cur, length = "s0", shots[0][1]
    w, h = COMPOSE_SIZE
    for k, (join, (_, n)) in enumerate(zip(joins, shots[1:]), start=1):
        nxt, out = f"s{k}", f"j{k}"
        if join[0] == "cut":
            chains.append(f"[{cur}][{nxt}]concat=n=2:v=1,settb=1/{COMPOSE_FPS}[{out}]")
            length += n
        elif join[0] == "dissolve":
            lap = join[1]
            chains.append(f"[{cur}][{nxt}]xfade=transition=fade:duration={lap / COMPOSE_FPS}:"
                          f"offset={(length - lap) / COMPOSE_FPS}[{out}]")
            length += n - lap
        elif join[0] == "fade":
            n_out, black, n_in = join[1:]
            chains.append(f"[{cur}]fade=t=out:s={length - n_out}:n={n_out}[o{k}]")
            chains.append(f"color=c=black:s={w}x{h}:r={COMPOSE_FPS},trim=end_frame={max(black, 1)},"
                          f"setpts=PTS-STARTPTS,settb=1/{COMPOSE_FPS},format=yuv444p[b{k}]")
            chains.append(f"[{nxt}]fade=t=in:s=0:n={n_in}[i{k}]")
            if black:
                chains.append(f"[o{k}][b{k}][i{k}]concat=n=3:v=1,settb=1/{COMPOSE_FPS}[{out}]")
            else:
                chains.append(f"[b{k}]nullsink;[o{k}][i{k}]concat=n=2:v=1,settb=1/{COMPOSE_FPS}[{out}]")
            length += black + n
        else:
            raise ValueError(f"join {join!r} must be cut, dissolve or fade")
        cur = out
    chains.append(f"[{cur}]format=yuv420p" if not solid else f"[{cur}]null")
    return ";".join(chains), [] if solid else [str(ASSETS / f) for f in files]


def _ffmpeg(graph: str, inputs: list[str], out: Path, lossless: bool) -> None:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y"]
    for f in inputs:
        cmd += ["-i", f]
    codec = ["-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p"] if lossless else ["-c:v", "libx264", "-crf", "18"]
    subprocess.run(cmd + ["-filter_complex", graph, "-an", *codec, str(out)], check=True)


def _decode_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@dataclass
class Edit:
    """A composed video and what is known about it: ``shots`` [start, end) of the clean frames of
    each shot, ``transitions`` [start, end) of the frames in between (mixed or black)."""

    path: Path
    frames: int
    shots: list[tuple[int, int]]
    transitions: list[tuple[int, int]]


def compose(path: Path, parts: list) -> Edit:
    """Write the edit ``parts`` (see :func:`compose_graph`) of real sample shots to ``path`` and
    find its exact shot and transition frames from the same edit of solid colours: a frame that
    is exactly one shot's colour is clean, any other frame is part of a transition."""
    _ffmpeg(*compose_graph(parts), path, lossless=False)
    solid = path.with_name(path.stem + "_solid.mp4")
    _ffmpeg(*compose_graph(parts, solid=True), solid, lossless=True)
    truth = _decode_rgb(solid).astype(np.int16)
    solid.unlink()
    n = len(truth)
    with av.open(str(path)) as c:
        real = sum(1 for _ in c.decode(video=0))
    assert real == n, f"{path.name}: {real} frames, its solid-colour twin {n}"
    colours = [np.array([int(c[2:4], 16), int(c[4:6], 16), int(c[6:8], 16)]) for c in _COLOURS]
    label = np.full(n, -1)
    for i, f in enumerate(truth):
        d = [np.abs(f - c).max() for c in colours]
        k = int(np.argmin(d))
        if d[k] <= 2:
            label[i] = k
    shots, transitions = [], []
    i = 0
    while i < n:
        j = i
        while j < n and label[j] == label[i]:
            j += 1
        (transitions if label[i] < 0 else shots).append((i, j))
        i = j
    return Edit(path, n, shots, transitions)
