"""caption: a small captioner protocol with two backends.

- ``TemplateCaptioner``: the sidecar ``<source>.txt`` next to the source video, else words from the
  file name. No model.
- ``VLMCaptioner``: a vision-language model through transformers (hub id or local folder), batched,
  8-bit through bitsandbytes on a GPU. The prompt asks for content only, so the trigger word is what
  carries the style.

A caption a person wrote lives in ``clips/<clip>.txt``; it is kept unless ``overwrite``. The trigger
word is applied by :func:`apply_trigger`, which is idempotent, so re-runs never add it twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TRIGGER_PLACEHOLDER = "[trigger]"


@dataclass
class CaptionItem:
    clip_path: Path  # the written clip
    source: str  # the source video it came from
    frames: int


class Captioner(Protocol):
    """Turns clips into caption bodies (no trigger word; :func:`apply_trigger` adds it)."""

    #: identifies the backend and its settings; a change re-captions machine-made captions
    fingerprint: str

    def caption(self, items: list[CaptionItem]) -> list[str]: ...


def apply_trigger(caption: str, trigger: str) -> str:
    """Fill ``[trigger]`` placeholders with ``trigger``, or put ``trigger, `` in front when the caption
    does not contain it yet (as a whole word). Applying it twice changes nothing."""
    caption = caption.strip()
    if TRIGGER_PLACEHOLDER in caption:
        return re.sub(r"\s+", " ", caption.replace(TRIGGER_PLACEHOLDER, trigger)).strip(" ,")
    if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def words_from_name(path: str | Path) -> str:
    """'my_cat-jumping.02.mp4' -> 'my cat jumping 02'."""
    return re.sub(r"[\s_\-.]+", " ", Path(path).stem).strip()


class TemplateCaptioner:
    """Caption = the source's sidecar text file (``footage/a.txt`` for ``footage/a.mp4``), else the
    file name as words. May contain ``[trigger]``."""

    fingerprint = "template-v1"

    def caption(self, items: list[CaptionItem]) -> list[str]:
        out = []
        for it in items:
            side = Path(it.source).with_suffix(".txt")
            text = side.read_text(encoding="utf-8").strip() if side.is_file() else ""
            out.append(text or words_from_name(it.source))
        return out


def sample_frames(path: Path, k: int) -> list:
    """k frames (PIL RGB images) spread evenly over a clip, first and last included."""
    import av

    with av.open(str(path)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    if k >= len(frames):
        return frames
    if k == 1:
        return [frames[len(frames) // 2]]
    return [frames[round(i * (len(frames) - 1) / (k - 1))] for i in range(k)]


class VLMCaptioner:
    """A transformers image-text-to-text model. ``model`` is a hub id or a local folder, loaded with
    ``AutoProcessor`` and ``AutoModelForImageTextToText.from_pretrained``. Each clip is shown as
    ``frames`` images in one user turn, followed by ``prompt``; generation is greedy.

    Raises UserError (from :meth:`load`) when the model cannot be found or is not a
    vision-language model.
    """

    def __init__(
        self,
        model: str,
        prompt: str,
        batch_size: int = 4,
        frames: int = 3,
        max_new_tokens: int = 96,
        load_8bit: bool = True,
        device: str | None = None,
    ):
        self.model_id = model
        self.prompt = prompt
        self.batch_size = batch_size
        self.frames = frames
        self.max_new_tokens = max_new_tokens
        self.load_8bit = load_8bit
        self.device = device
        self.fingerprint = f"vlm:{model}|{prompt}|{frames}|{max_new_tokens}"
        self.model = None
        self.processor = None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from finetune.errors import UserError

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
        if device == "cuda" and self.load_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": 0}
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            model = AutoModelForImageTextToText.from_pretrained(self.model_id, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(
                f"--captioner {self.model_id}: cannot load a vision-language model ({type(e).__name__}: {e}); "
                "pass a hub id such as Qwen/Qwen2.5-VL-7B-Instruct, a local folder saved with save_pretrained, "
                "or 'template'"
            ) from e
        if "device_map" not in kwargs:
            model.to(device)
        self.model = model.eval()
        self.device = device
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # batched generation continues from the right end

    def _messages(self, n_images: int) -> list[dict]:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": self.prompt}]
        return [{"role": "user", "content": content}]

    def caption(self, items: list[CaptionItem]) -> list[str]:
        import torch

        if self.model is None:
            self.load()
        out: list[str] = []
        for b in range(0, len(items), self.batch_size):
            batch = items[b : b + self.batch_size]
            images = [sample_frames(it.clip_path, self.frames) for it in batch]
            texts = [
                self.processor.apply_chat_template(self._messages(len(im)), add_generation_prompt=True, tokenize=False)
                for im in images
            ]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.model.device)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1] :]
            out += [clean_caption(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out


def clean_caption(text: str) -> str:
    """One line, no leading 'The video shows', no surrounding quotes."""
    text = re.sub(r"\s+", " ", text).strip().strip('"').strip()
    text = re.sub(r"^(the|this) (video|clip) (shows|depicts)\s+", "", text, flags=re.I)
    return text[:1].upper() + text[1:] if text else text


def make_captioner(opts) -> Captioner:
    """The backend ``opts.captioner`` names: 'template' or a VLM hub id / folder."""
    if opts.captioner == "template":
        return TemplateCaptioner()
    return VLMCaptioner(
        opts.captioner,
        prompt=opts.caption_prompt,
        batch_size=opts.caption_batch,
        frames=opts.caption_frames,
        max_new_tokens=opts.max_new_tokens,
        load_8bit=opts.load_8bit,
    )
