"""Reading training clips and writing rendered videos, with PyAV.

PyAV rather than decord here: it opens every container ffmpeg does (decord cannot read Theora
and mis-indexes MPEG-PS with a start offset) and gives real timestamps to resample by.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from finetune.errors import DataError


def read_clip(path: str | Path, frames: int, fps: float, height: int, width: int) -> torch.Tensor:
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
    video = torch.from_numpy(np.stack(picked)).permute(3, 0, 1, 2).float()  # [3, F, H, W]
    video = resize_cover(video, height, width)
    return video / 127.5 - 1.0


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


def resize_cover(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """video: [C, F, H, W] -> [C, F, height, width], scaled to cover then centre-cropped."""
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(video.permute(1, 0, 2, 3), size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False).permute(1, 0, 2, 3)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top:top + height, left:left + width].clamp(0, 255)


def write_video(frames: np.ndarray | torch.Tensor, path: str | Path, fps: float) -> Path:
    """Write ``frames`` [F, H, W, 3] (uint8, or float in [0, 1]) as constant-frame-rate H.264
    mp4 (yuv420p; odd sizes are padded by one pixel). Written to a temp file, then renamed."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    n, h, w, _ = frames.shape
    # yuv420p needs even sizes.
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)
    return path


def probe_frames(path: str | Path) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a written video, counting decoded frames."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.codec_context.height, s.codec_context.width, float(s.average_rate or 0)
