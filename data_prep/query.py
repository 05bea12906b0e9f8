"""query: keep only the shots a text describes ("night street, neon"), scored by a text-image
embedding model (SigLIP 2 by default) on a few frames sampled from each shot.

A shot's embedding is the normalised mean of its frames' image embeddings; its score is the model's
match probability for the text, ``sigmoid(scale * cos + bias)`` with SigLIP's own learned scale and
bias (a model without a bias, such as CLIP, scores the cosine itself). Scores therefore rank shots
by cosine similarity whatever the model.

Image embeddings are cached per source in ``dataset/query/<key>.npz`` so a new query text re-encodes
only the text; the frames scored are saved as ``query/<key>_sNNN.jpg`` for the review page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from data_prep.options import DEFAULT_QUERY_MODEL
from data_prep.split import ShotList


def shot_sample_frames(shots: ShotList, k: int) -> dict[int, list[int]]:
    """Per shot index, ``k`` frame indices spread inside it (centres of k equal parts)."""
    out = {}
    for s in shots.shots:
        n = s.end_frame - s.start_frame
        out[s.index] = sorted({s.start_frame + min(n - 1, int((j + 0.5) * n / k)) for j in range(k)})
    return out


def grab_frames(path: str, wanted: set[int], rotation: int = 0, width: int = 256) -> dict[int, np.ndarray]:
    """Decode ``path`` up to the last wanted frame and return those frames as RGB [h, w, 3] uint8,
    about ``width`` px wide, rotated for display. Frame numbers are decode order, as in split."""
    from av.video.reformatter import VideoReformatter

    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    last = max(wanted)
    reformatter = VideoReformatter()
    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                scale = max(1.0, frame.width / width)
                w, h = max(2, round(frame.width / scale)), max(2, round(frame.height / scale))
                img = reformatter.reformat(frame, w, h, "rgb24", interpolation="AREA").to_ndarray()
                out[i] = np.ascontiguousarray(np.rot90(img, (rotation // 90) % 4)) if rotation else img
            if i >= last:
                break
    return out


def shot_embeddings(frame_embs: np.ndarray, groups: list[int], n_shots: int) -> np.ndarray:
    """Normalised mean of unit frame embeddings per shot.

    frame_embs: [N, D] (rows unit length); groups: [N] shot position of each row (0..n_shots-1).
    Returns [n_shots, D], rows unit length (zero for a shot with no frames).
    """
    out = np.zeros((n_shots, frame_embs.shape[1]), dtype=np.float64)
    for g, e in zip(groups, frame_embs):
        out[g] += e
    return _unit(out)


def match_scores(shot_embs: np.ndarray, text_emb: np.ndarray, scale: float, bias: float | None) -> np.ndarray:
    """shot_embs: [S, D] unit rows; text_emb: [D] unit. Returns [S]: sigmoid(scale * cos + bias),
    or the cosine when the model has no bias. Monotonic in the cosine either way."""
    cos = shot_embs @ text_emb
    if bias is None:
        return cos
    return 1.0 / (1.0 + np.exp(-(scale * cos + bias)))


def select_shots(scores: dict[tuple[str, int], float], top: int | None, min_score: float | None) -> set[tuple[str, int]]:
    """Shots kept: the ``top`` best (ties broken by source and shot order) and/or those scoring at
    least ``min_score``; both given means both must hold."""
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    keep = set(ranked[:top]) if top is not None else set(ranked)
    if min_score is not None:
        keep = {k for k in keep if scores[k] >= min_score}
    return keep


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class ShotScorer:
    """A transformers text-image embedding model (SigLIP, SigLIP 2, CLIP ...): ``model`` is a hub id
    or a local folder loaded with ``AutoProcessor`` and ``AutoModel.from_pretrained``; 8-bit with
    bitsandbytes on a GPU when ``load_8bit``.

    Raises UserError (from :meth:`load`) when the model cannot be loaded or has no text and image
    towers.
    """

    model_id: str = DEFAULT_QUERY_MODEL
    load_8bit: bool = True
    device: str | None = None
    batch_size: int = 16

    def __post_init__(self):
        self.model = None
        self.processor = None

    def load(self) -> None:
        import torch
        from transformers import AutoModel, AutoProcessor

        from finetune.errors import UserError

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict = {"dtype": torch.float16 if device == "cuda" else torch.float32}
        if device == "cuda" and self.load_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": 0}
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            model = AutoModel.from_pretrained(self.model_id, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(
                f"--query-model {self.model_id}: cannot load a text-image model ({type(e).__name__}: {e}); "
                f"pass a hub id such as {DEFAULT_QUERY_MODEL} or a local folder saved with save_pretrained"
            ) from e
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise UserError(
                f"--query-model {self.model_id}: {type(model).__name__} is not a text-image embedding model "
                f"(no get_text_features/get_image_features); try {DEFAULT_QUERY_MODEL}"
            )
        if "device_map" not in kwargs:
            model.to(device)
        self.model = model.eval()
        self.device = device

    @property
    def scale_bias(self) -> tuple[float, float | None]:
        scale = float(self.model.logit_scale.detach().exp()) if hasattr(self.model, "logit_scale") else 1.0
        bias = float(self.model.logit_bias.detach()) if getattr(self.model, "logit_bias", None) is not None else None
        return scale, bias

    def image_embeddings(self, images: list[np.ndarray]) -> np.ndarray:
        """images: RGB [h, w, 3] uint8. Returns [N, D] float32, unit rows."""
        import torch

        if self.model is None:
            self.load()
        out = []
        for b in range(0, len(images), self.batch_size):
            inputs = self.processor(images=images[b : b + self.batch_size], return_tensors="pt").to(self.model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                out.append(_features(self.model.get_image_features(**inputs)))
        return _unit(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)

    def text_embedding(self, text: str) -> np.ndarray:
        """Returns [D] float32, unit length. SigLIP was trained on lower-case text padded to 64 tokens."""
        import torch

        if self.model is None:
            self.load()
        max_len = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 64)
        inputs = self.processor(text=[text.lower()], padding="max_length", max_length=min(64, max_len),
                                truncation=True, return_tensors="pt").to(self.model.device)  # fmt: skip
        with torch.inference_mode():
            return _unit(_features(self.model.get_text_features(**inputs)))[0]


def _features(out) -> np.ndarray:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    t = out if hasattr(out, "float") else out.pooler_output
    return t.float().cpu().numpy()


def embed_source(scorer: ShotScorer, shots: ShotList, rotation: int, frames_per_shot: int, thumbs: Path | None = None, key: str = "") -> np.ndarray:
    """[S, D] unit embeddings of every shot of one source (rows in ``shots.shots`` order). With
    ``thumbs``, the middle sampled frame of each shot is saved there as ``<key>_sNNN.jpg``."""
    from PIL import Image

    samples = shot_sample_frames(shots, frames_per_shot)
    frames = grab_frames(shots.source, {i for v in samples.values() for i in v}, rotation)
    images, groups = [], []
    for pos, shot in enumerate(shots.shots):
        got = [frames[i] for i in samples[shot.index] if i in frames]
        if thumbs is not None and got:
            thumbs.mkdir(parents=True, exist_ok=True)
            Image.fromarray(got[len(got) // 2]).save(thumbs / f"{key}_s{shot.index:03d}.jpg", quality=85)
        images += got
        groups += [pos] * len(got)
    if not images:
        return np.zeros((len(shots.shots), 1), np.float32)
    return shot_embeddings(scorer.image_embeddings(images), groups, len(shots.shots)).astype(np.float32)
