"""Settings of a data_prep run: one typed field each, with its default, a one-line doc and bounds.

``PrepOptions.check()`` reports every problem at once; family facts (frame rule, spatial factor,
default fps) come from ``finetune.families`` and are looked up only when clips are cut, so probe
and split never import torch.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from finetune.errors import UserError

DEFAULT_VLM_PROMPT = (
    "Describe this video clip in one or two plain sentences: the subjects, what they do, the setting, "
    "the camera motion and the lighting. Describe only the content. Do not mention the artistic style, "
    "the medium, the colour grading or the quality, and do not start with 'The video shows'."
)


DEFAULT_QUERY_MIN = 0.1
DEFAULT_QUERY_MODEL = "google/siglip2-base-patch16-224"


class OptionsError(UserError):
    """One or more options are invalid; the message lists every one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        n = len(problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} with the options:\n" + "\n".join(f"  - {p}" for p in problems))


def _spec(default: Any, doc: str, **bounds: Any):
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass
class PrepOptions:
    # --- clips: what the trainer gets ---
    family: str = _spec("wan", "model family whose frame and size rules the clips follow (finetune.families)")
    frames: int = _spec(81, "frames per clip; must fit the family's rule (wan 4k+1, ltx 8k+1, mochi 6k+1)", ge=1, le=1025)
    fps: float | None = _spec(None, "clip frame rate; sources are resampled so motion keeps its speed (default: the family's)", gt=0, le=240)
    size: str = _spec("832x480", "WxH of the main landscape bucket; both must be multiples of the family's spatial factor")
    buckets: str = _spec("auto", "aspect-ratio buckets: 'auto' (size, its portrait twin, a square of similar area), 'fixed' (size only) or 'WxH,WxH,...'")
    mode: str = _spec("head", "where clips come from in a shot: head (one at its start), uniform (clips_per_shot spread out), sliding (every stride frames)", choices=("head", "uniform", "sliding"))
    clips_per_shot: int = _spec(3, "clips per shot in uniform mode", ge=1, le=1000)
    stride: int | None = _spec(None, "sliding mode: step between clip starts, in output frames (default: frames, no overlap)", ge=1)
    crf: int = _spec(18, "H.264 quality of written clips (lower is better; 18 is visually lossless)", ge=0, le=51)
    preset: str = _spec("veryfast", "x264 speed preset of written clips", choices=("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"))
    # --- shot detection ---
    detector: str = _spec("adaptive", "PySceneDetect detector: adaptive (robust to camera motion) or content", choices=("adaptive", "content"))
    threshold: float | None = _spec(None, "detector threshold (default: adaptive 3.0, content 27.0)", gt=0)
    min_shot_len: int = _spec(15, "shortest shot in source frames; closer cuts are merged", ge=1)
    transitions: bool = _spec(True, "fades to/from black and dissolves are shot boundaries too; their frames go in no clip")
    # --- query: keep only the shots a text describes ---
    query: str = _spec("", "keep only shots matching this description, e.g. 'night street, neon' (empty: every shot)")
    query_top: int | None = _spec(None, "keep the K best-matching shots over all files", ge=1)
    query_min: float | None = _spec(None, "keep shots scoring at least this match probability, 0-1 (default 0.1 when --query-top is not given)", ge=0, le=1)
    query_model: str = _spec(DEFAULT_QUERY_MODEL, "text-image embedding model that scores shots: hub id or local folder (SigLIP, SigLIP 2, CLIP)")
    query_frames: int = _spec(3, "frames sampled per shot for the query score", ge=1, le=32)
    # --- filter: clips set aside, never deleted ---
    filter: bool = _spec(True, "set aside near-duplicate, static, dark and blurred clips")
    dup_distance: float = _spec(4.0, "clips whose perceptual hashes differ by at most this many bits (of 64, averaged over sampled frames) are duplicates", ge=0, le=64)
    static_threshold: float = _spec(0.8, "mean absolute change between sampled frames (0-255) below which a clip is static", ge=0)
    dark_threshold: float = _spec(12.0, "mean luma (0-255) below which a clip is too dark", ge=0, le=255)
    blur_threshold: float = _spec(8.0, "variance of the Laplacian of the middle frame below which a clip is blurred", ge=0)
    # --- captions ---
    captioner: str = _spec("template", "'template' (trigger + sidecar .txt or file name) or a vision-language model: hub id or local folder")
    trigger: str = _spec("", "trigger word: put before each caption, or where a caption says [trigger]")
    overwrite: bool = _spec(False, "replace captions a person wrote (clips/<clip>.txt) as well")
    caption_batch: int = _spec(4, "clips per captioning batch", ge=1, le=256)
    caption_frames: int = _spec(3, "frames shown to the vision-language model per clip", ge=1, le=32)
    caption_prompt: str = _spec(DEFAULT_VLM_PROMPT, "instruction given to the vision-language model")
    max_new_tokens: int = _spec(96, "longest generated caption, in tokens", ge=1, le=1024)
    load_8bit: bool = _spec(True, "load the vision-language and query models in 8 bit with bitsandbytes (GPU only; ignored on CPU)")
    # --- run ---
    workers: int = _spec(0, "files decoded at once (0: one per CPU core)", ge=0, le=256)
    progress: bool = _spec(True, "show progress bars")

    # ------------------------------------------------------------------
    def check(self) -> None:
        """Raise OptionsError listing every out-of-bounds field and malformed size."""
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            m = f.metadata
            if v is None:
                continue
            if "choices" in m and v not in m["choices"]:
                problems.append(f"{f.name}={v!r} must be one of {', '.join(m['choices'])}")
            if "ge" in m and v < m["ge"]:
                problems.append(f"{f.name}={v} must be >= {m['ge']}")
            if "gt" in m and v <= m["gt"]:
                problems.append(f"{f.name}={v} must be > {m['gt']}")
            if "le" in m and v > m["le"]:
                problems.append(f"{f.name}={v} must be <= {m['le']}")
        try:
            parse_size(self.size)
        except ValueError as e:
            problems.append(str(e))
        if self.buckets not in ("auto", "fixed"):
            for part in self.buckets.split(","):
                try:
                    parse_size(part.strip())
                except ValueError as e:
                    problems.append(f"buckets: {e}")
        for name in ("query_top", "query_min"):
            if getattr(self, name) is not None and not self.query.strip():
                problems.append(f"{name}={getattr(self, name)} needs a query (--query 'what the shots show')")
        if problems:
            raise OptionsError(problems)

    @property
    def query_rule(self) -> tuple[int | None, float | None]:
        """(top, min_score) that select shots; a bare query keeps shots scoring 0.1 or more."""
        if self.query_top is None and self.query_min is None:
            return None, DEFAULT_QUERY_MIN
        return self.query_top, self.query_min

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def docs(cls) -> dict[str, str]:
        return {f.name: f.metadata["doc"] for f in fields(cls)}


def parse_size(text: str) -> tuple[int, int]:
    """'832x480' -> (832, 480). Raises ValueError naming the text."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"size {text!r} must look like WIDTHxHEIGHT, e.g. 832x480")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class FamilyFacts:
    """The few facts about a model family that cutting needs."""

    name: str
    frame_rule: Any  # finetune.families.FrameRule
    spatial_factor: int
    default_fps: float


def family_facts(name: str) -> FamilyFacts:
    """Look the family up in the registry (imports torch and diffusers, so only call when cutting)."""
    from finetune.families import get_family

    try:
        fam = get_family(name)
    except KeyError as e:
        raise UserError(f"--family {name}: {e.args[0]}") from None
    return FamilyFacts(fam.name, fam.frame_rule, int(fam.spatial_factor), float(fam.default_fps))


def resolve_clip_settings(opts: PrepOptions, facts: FamilyFacts) -> tuple[float, list[tuple[int, int]]]:
    """The clip fps and the bucket sizes, checked against the family. Raises OptionsError listing
    every mismatch with a suggested fix."""
    problems = []
    rule = facts.frame_rule
    if not rule.is_valid(opts.frames):
        problems.append(
            f"frames={opts.frames} must be {rule.describe()} for {facts.name} (try {rule.nearest(opts.frames)})"
        )
    fps = float(opts.fps) if opts.fps else facts.default_fps
    w, h = parse_size(opts.size)
    if opts.buckets == "auto":
        sf = facts.spatial_factor
        side = max(sf, round((w * h) ** 0.5 / sf) * sf)
        sizes = [(w, h), (h, w), (side, side)]
    elif opts.buckets == "fixed":
        sizes = [(w, h)]
    else:
        sizes = [parse_size(p) for p in opts.buckets.split(",")]
    buckets = list(dict.fromkeys(sizes))
    sf = facts.spatial_factor
    for bw, bh in buckets:
        if bw % sf or bh % sf:
            fix = f"{max(sf, round(bw / sf) * sf)}x{max(sf, round(bh / sf) * sf)}"
            problems.append(f"size {bw}x{bh} must be a multiple of {sf} on both sides for {facts.name} (try {fix})")
    if problems:
        raise OptionsError(problems)
    return fps, buckets
