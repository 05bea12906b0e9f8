"""Reading training clips and writing rendered videos, with PyAV.

PyAV rather than decord here: it opens every container ffmpeg does (decord cannot read Theora
and mis-indexes MPEG-PS with a start offset) and gives real timestamps to resample by.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np

from finetune.errors import DataError

if TYPE_CHECKING:
    import torch

_LAYOUTS = {1: "mono", 2: "stereo"}

# torch is imported inside the functions that need it: data_prep writes clips with Mp4Writer and
# its probe/split commands run without loading torch.


def read_clip(path: str | Path, frames: int, fps: float, height: int, width: int) -> "torch.Tensor":
    """Decode the first ``frames`` frames of ``path`` resampled to ``fps`` (nearest frame by
    timestamp, so motion keeps its real speed), resized to cover ``height`` x ``width`` and
    centre-cropped.

    Returns: [3, frames, height, width] float32 in [-1, 1].
    Raises: DataError if the file cannot be decoded or holds fewer than ``frames`` frames at ``fps``.
    """
    path = Path(path)
    picked = _decode_resampled(path, frames, fps)
    if len(picked) < frames:
        raise DataError(
            f"{path}: clip too short: {len(picked)} frames at {fps:g} fps, the recipe needs data.frames={frames} "
            f"(cut longer clips, or lower data.frames)"
        )
    import torch

    video = torch.from_numpy(np.stack(picked)).permute(3, 0, 1, 2).float()  # [3, F, H, W]
    video = resize_cover(video, height, width)
    return video / 127.5 - 1.0


def pil_frames(video: "torch.Tensor") -> list:
    """video [3, F, H, W] in [-1, 1] (as from read_clip) -> F RGB PIL images (a video a
    pipeline conditions on)."""
    import torch
    from PIL import Image

    frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    return [Image.fromarray(f) for f in frames]


def pil_image(frame: "torch.Tensor"):
    """frame [3, H, W] in [-1, 1] -> an RGB PIL image (an i2v pipeline's conditioning image)."""
    return pil_frames(frame.unsqueeze(1))[0]


def first_frame(path: str | Path):
    """The first decoded frame of ``path`` as an RGB PIL image (an i2v conditioning image).
    Raises DataError if nothing decodes."""
    from PIL import Image

    picked = _decode_resampled(Path(path), 1, 1.0)
    if not picked:
        raise DataError(f"{path}: no decodable frame for the conditioning image")
    return Image.fromarray(picked[0])


def decoded_frame_count(path: str | Path, fps: float) -> int:
    """How many frames ``path`` yields resampled to ``fps`` (decodes it once; what
    ``read_clip(path, n, fps, ...)`` can read at most). Raises DataError if it cannot be opened."""
    return len(_decode_resampled(Path(path), 10**9, fps))


def _decode_resampled(path: Path, frames: int, fps: float) -> list[np.ndarray]:
    """RGB uint8 frames [H, W, 3] at times t0 + i/fps, i < frames (nearest decoded frame)."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot open video ({e}); re-encode it, e.g. with `python -m data_prep cut`") from None
    picked: list[np.ndarray] = []
    with container:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t0 = None
        prev = None  # (time, frame) of the last decoded frame
        try:
            for frame in container.decode(stream):
                t = float(frame.pts * frame.time_base) if frame.pts is not None else (len(picked) / fps)
                t0 = t if t0 is None else t0
                img = frame.to_ndarray(format="rgb24")
                # Emit every target time that this frame is the nearest to.
                while len(picked) < frames:
                    target = t0 + len(picked) / fps
                    if t < target:
                        break
                    if prev is not None and abs(prev[0] - target) < abs(t - target):
                        picked.append(prev[1])
                    else:
                        picked.append(img)
                prev = (t, img)
                if len(picked) >= frames:
                    break
        except av.error.FFmpegError as e:
            raise DataError(f"{path}: decoding failed after {len(picked)} frames ({e})") from None
        # The last decoded frame also stands for a target within half a frame after it.
        if prev is not None and len(picked) < frames and prev[0] >= t0 + len(picked) / fps - 0.5 / fps:
            picked.append(prev[1])
    return picked


def resize_cover(video: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """video: [C, F, H, W] -> [C, F, height, width], scaled to cover then centre-cropped."""
    import torch.nn.functional as F

    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video.permute(1, 0, 2, 3), size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False).permute(1, 0, 2, 3)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top:top + height, left:left + width].clamp(0, 255)


class Mp4Writer:
    """An open H.264 encoder for one video: constant frame rate, pts 0, 1, 2, ... in 1/fps units,
    yuv420p (so ``width`` and ``height`` must be even). Writes to a temporary name and renames
    on ``close``, so a killed run never leaves half a file; ``abort`` removes the temporary file.

    ``audio_rate``: also open an AAC track at that sample rate (``audio_channels`` channels) for
    :meth:`add_audio`; the track must exist before the first frame, as the mp4 header lists it."""

    def __init__(self, path: str | Path, fps: float, width: int, height: int, crf: int = 18, preset: str = "veryfast",
                 audio_rate: int | None = None, audio_channels: int = 2):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.stem + ".part.mp4")
        self.container = av.open(str(self.tmp), "w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = 1 / rate
        self.frames_written = 0
        self.audio_stream = None
        if audio_rate:
            self.audio_stream = self.container.add_stream("aac", rate=int(audio_rate), layout=_LAYOUTS[audio_channels])
            self.audio_stream.codec_context.time_base = Fraction(1, int(audio_rate))

    def add_audio(self, samples: np.ndarray) -> None:
        """samples: [channels, n] float in [-1, 1] at the writer's ``audio_rate``, from time 0 (the
        first video frame). Encoded as AAC in 1024-sample frames. Raises ValueError if the writer
        has no audio track or the channel count differs."""
        a = self.audio_stream
        if a is None:
            raise ValueError(f"{self.path}: this Mp4Writer has no audio track (pass audio_rate)")
        samples = np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)
        if samples.ndim != 2 or samples.shape[0] != a.codec_context.layout.nb_channels:
            raise ValueError(f"{self.path}: audio must be [{a.codec_context.layout.nb_channels}, n], "
                             f"got {tuple(samples.shape)}")
        step = 1024  # one AAC frame
        for i in range(0, samples.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + step]), format="fltp",
                                               layout=a.codec_context.layout.name)
            frame.sample_rate, frame.pts, frame.time_base = a.codec_context.sample_rate, i, a.codec_context.time_base
            for packet in a.encode(frame):
                self.container.mux(packet)

    def add(self, rgb: np.ndarray) -> None:
        """rgb: [height, width, 3] uint8."""
        self.add_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24"))

    def add_frame(self, frame: "av.VideoFrame") -> None:
        """A frame of the stream's size in any pixel format (yuv420p goes to x264 unconverted)."""
        frame.pts = self.frames_written
        self.frames_written += 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> Path:
        for stream in (self.stream, self.audio_stream):
            for packet in stream.encode() if stream is not None else ():
                self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def side_by_side(left: "torch.Tensor", right: "torch.Tensor", gap: int = 2) -> "torch.Tensor":
    """Two videos [F, H, W, 3] in [0, 1] -> [F, H, 2W + gap, 3], a white bar between them
    (left: without a LoRA, right: with it, in the trainer's samples, publish's previews and the demo)."""
    import torch

    bar = torch.ones(left.shape[0], left.shape[1], gap, 3)
    return torch.cat([left.float().cpu(), bar, right.float().cpu()], dim=2)


def write_video(frames: np.ndarray | "torch.Tensor", path: str | Path, fps: float,
                audio: tuple[np.ndarray, int] | None = None) -> Path:
    """Write ``frames`` [F, H, W, 3] (uint8, or float in [0, 1]) as constant-frame-rate H.264
    mp4 (yuv420p; odd sizes are padded by one pixel), with ``audio`` = (samples [channels, n]
    float in [-1, 1], sample rate) as an AAC track if given. Written to a temp file, then renamed."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    n, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2  # yuv420p needs even sizes
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    writer = Mp4Writer(path, fps, pw, ph, audio_rate=audio[1] if audio else None,
                       audio_channels=audio[0].shape[0] if audio else 2)
    try:
        for i in range(n):
            writer.add(frames[i])
        if audio:
            writer.add_audio(audio[0])
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def probe_frames(path: str | Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a written video, counting decoded frames."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.codec_context.height, s.codec_context.width, float(s.average_rate or 0)


def has_audio(path: str | Path) -> bool:
    """Whether ``path`` holds an audio stream. Raises DataError if it cannot be opened."""
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            return bool(c.streams.audio)
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot open ({e})") from None


def read_audio(path: str | Path, rate: int, channels: int = 2, start: float = 0.0,
               duration: float | None = None, relative_to_video: bool = True) -> np.ndarray | None:
    """The first audio stream of ``path`` from ``start`` seconds for ``duration`` seconds (None:
    to its end), resampled by PyAV (ffmpeg's swresample) to ``rate`` Hz and ``channels`` (1 mono,
    2 stereo; a mono source is copied to both channels, a surround one downmixed). Times count
    from the video stream's start when ``relative_to_video`` (as clip and shot times do), so sound
    and picture stay in step even when the streams start at different times; stretches without
    sound (before the audio starts, after it ends) are silence, so a given ``duration`` always
    gives ``round(duration * rate)`` samples.

    Returns: [channels, n] float32 in [-1, 1], or None if ``path`` has no audio stream.
    Raises: DataError if the file cannot be opened or its audio cannot be decoded.
    """
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot open ({e})") from None
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        origin = 0.0
        if relative_to_video and container.streams.video:
            v = container.streams.video[0]
            origin = float(v.start_time * v.time_base) if v.start_time is not None else 0.0
        t0 = origin + start
        if t0 > 1.0 and stream.time_base:  # long sources: jump near the start, decode from a key frame before it
            container.seek(int((t0 - 1.0) / stream.time_base), stream=stream, backward=True)
        resampler = av.AudioResampler(format="fltp", layout=_LAYOUTS[channels], rate=int(rate))
        chunks: list[np.ndarray] = []
        first: float | None = None  # time of the first decoded sample
        end = None if duration is None else t0 + duration
        try:
            for frame in container.decode(stream):
                if first is None:
                    first = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(channels, -1))
                got = sum(c.shape[1] for c in chunks)
                if end is not None and first + got / rate >= end + 0.1:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(channels, -1))
        except av.error.FFmpegError as e:
            raise DataError(f"{path}: decoding its audio failed ({e})") from None
    decoded = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    first = t0 if first is None else first
    offset = round((t0 - first) * rate)  # samples to drop (>0) or silence to put before (<0)
    decoded = decoded[:, offset:] if offset >= 0 else np.concatenate(
        [np.zeros((channels, -offset), np.float32), decoded], axis=1)
    if duration is None:
        return decoded.astype(np.float32)
    n = round(duration * rate)
    out = np.zeros((channels, n), np.float32)
    out[:, :min(n, decoded.shape[1])] = decoded[:, :n]
    return out
