"""LoRA files in the layouts other tools use, converted exactly (alpha included) to and from ours.

Three layouts of the same adapter, each per module ``m`` of one transformer:

  diffusers  ``transformer.<m>.lora_A.weight`` / ``.lora_B.weight``; rank and alpha in the
             safetensors metadata (``lora_adapter_metadata``), as the run folder's file (an
             ``<m>.alpha`` tensor, as some tools write, is read too).
             PEFT files (``base_model.model.<m>.lora_A[.default].weight``) read the same way.
  comfyui    ``diffusion_model.<o>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``, where ``o``
             is the module's name in the original checkpoint (what ComfyUI's model uses).
             ComfyUI ignores safetensors metadata, so alpha travels as a scalar tensor.
  kohya      ``lora_unet_<o with . as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
             (sd-scripts, musubi-tuner).

Each family gives the renames between diffusers and original names as a :class:`KeyMap`
(``Family.comfyui_key_map``); everything here is generic and works per (transformer, key map),
so a model with two transformers writes one file per transformer.

Tensors: ``down`` (lora_A) [r, in, *kernel], ``up`` (lora_B) [out, r, *1s]; the update is
``alpha / r * up @ down``. A file without alpha means alpha = r (kohya's and diffusers' rule).

Fused modules: where the original checkpoint has one Linear for several diffusers modules
(HunyuanVideo's ``img_attn_qkv`` = ``to_q``, ``to_k``, ``to_v``), the key map says so
(:func:`fused`) and the file holds one LoRA on the fused module: the parts' downs stacked along
the rank axis and their ups block diagonal, alpha scaled to the summed rank -- exact, and what
ComfyUI applies to the fused weight. Reading splits it back (exactly for our files and for any
block-diagonal file; a full-rank fused LoRA from another tool gives each part the same down and
its rows of up, the same update). See :func:`fuse` and :func:`unfuse`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from finetune.errors import AdapterError, UserError

LAYOUTS = ("diffusers", "comfyui", "kohya")
# File name of a run folder's ComfyUI adapter (one per transformer: see comfyui_weight_name).
COMFYUI_WEIGHT_NAME = "comfyui_lora.safetensors"
# safetensors metadata key holding the run description (video_lora.json) in the files we write.
INFO_KEY = "video_lora"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key (diffusers.loaders.lora_base)
_COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_PEFT_PREFIXES = ("base_model.model.",)
# Module types peft can put a LoRA on (its lora.layer dispatch), i.e. what a key map must cover.
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
_FIELD = re.compile(r"\{(\w+)\}")


class LoraFormatError(UserError):
    """A LoRA file matches no known layout, or does not fit the model it is used with."""


# ---------------------------------------------------------------------------- key maps


def _template_regex(template: str, sep: str = ".") -> re.Pattern:
    """``blocks.{i}.self_attn.q`` -> a full-match regex with a digit group per ``{field}``;
    ``sep`` replaces the dots (kohya names use ``_``)."""
    parts = _FIELD.split(template)
    body = "".join(re.escape(p.replace(".", sep)) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    return re.compile(body + r"\Z")


@dataclass(frozen=True)
class Rule:
    """One entry of a :class:`KeyMap`: diffusers module(s) <-> one original module.

    ``diffusers``: one template, or the parts of a fused original module (``to_q``, ``to_k``,
    ``to_v`` -> ``self_attn_qkv``), or with ``choose`` the alternatives one original name stands
    for in different blocks.
    ``sizes``: the parts' relative output widths (default equal; HunyuanVideo's single-block
    ``linear1`` is q, k, v, mlp = 1, 1, 1, 4), used to cut a fused file's rows.
    ``chunks``, ``pieces``: how the original stacks output rows: each part's rows cut into
    ``chunks`` equal chunks, the original's rows being the chunks (part, chunk) in ``pieces``
    order (default: part after part). One part with pieces ((0, 1), (0, 0)) is a module whose
    two halves are swapped (shift/scale of a final adaLN); CogVideoX interleaves norm1's and
    norm2's modulation chunks in one Linear.
    ``embedding``: an ``nn.Embedding``; peft keeps its factors transposed (``lora_embedding_A``
    [r, num], ``_B`` [dim, r]), files in original naming hold them as for any weight.
    ``choose``: for alternatives, (out, in) of a LoRA's update -> index of the diffusers name
    it belongs to (Mochi's last block names its ``mod_y`` differently)."""

    diffusers: tuple[str, ...]
    original: str
    sizes: tuple[int, ...] | None = None
    chunks: int = 1
    pieces: tuple[tuple[int, int], ...] | None = None
    embedding: bool = False
    choose: Callable[[int, int], int] | None = None

    def __post_init__(self) -> None:
        if self.sizes is not None and len(self.sizes) != len(self.diffusers):
            raise ValueError(f"{self.original}: {len(self.sizes)} sizes for {len(self.diffusers)} parts")
        n = 1 if self.choose else len(self.diffusers)
        layout = self.pieces or tuple((j, k) for j in range(n) for k in range(self.chunks))
        if sorted(layout) != [(j, k) for j in range(n) for k in range(self.chunks)]:
            raise ValueError(f"{self.original}: pieces {layout} must name each (part, chunk) once")
        object.__setattr__(self, "pieces", layout)

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1 and self.choose is None

    @property
    def reordered(self) -> bool:
        """Whether the original's rows are not the diffusers rows in order."""
        return self.pieces != tuple((j, k) for j in range(len(self.diffusers)) for k in range(self.chunks))


def fused(parts: tuple[str, ...] | list[str], original: str, sizes: tuple[int, ...] | None = None,
          chunks: int = 1, pieces: tuple[tuple[int, int], ...] | None = None) -> Rule:
    """A KeyMap entry for an original module that stores ``parts`` (diffusers templates) stacked
    along its output rows; see :class:`Rule`."""
    return Rule(tuple(parts), original, sizes=sizes, chunks=chunks, pieces=pieces)


def swapped_halves(diffusers: str, original: str) -> Rule:
    """A one-to-one KeyMap entry whose original has the two halves of its output rows swapped
    (scale/shift of a final adaLN, proj/gate of a GEGLU input)."""
    return Rule((diffusers,), original, chunks=2, pieces=((0, 1), (0, 0)))


def embedding(diffusers: str, original: str) -> Rule:
    """A one-to-one KeyMap entry for an ``nn.Embedding``."""
    return Rule((diffusers,), original, embedding=True)


def alternatives(names: tuple[str, ...] | list[str], original: str, choose: Callable[[int, int], int]) -> Rule:
    """A KeyMap entry for an original name that stands for one of ``names`` depending on the block;
    ``choose(out, in)`` tells which from a LoRA's shape."""
    return Rule(tuple(names), original, choose=choose)


@dataclass(frozen=True)
class Match:
    """What an original (or kohya) name stands for: its rule, the diffusers names of its parts
    (one unless fused or alternatives), and the original name (the diffusers name where a file
    uses diffusers naming; its rule then reorders nothing)."""

    rule: Rule
    names: tuple[str, ...]
    original: str


@dataclass(frozen=True)
class KeyMap:
    """Renames between a transformer's diffusers module names and the original checkpoint's.

    ``pairs``: entries, each a (diffusers template, original template) pair, e.g.
    ``("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q")``, or a :class:`Rule` (made with
    :func:`fused`, :func:`swapped_halves`, :func:`embedding`, :func:`alternatives`) for an
    original module that fuses several diffusers modules or stores its rows otherwise. ``{field}`` stands for a block
    number and must appear on both sides. The first entry that matches a name wins. A map is
    complete for a model when every adaptable module maps to exactly one original module and
    back, a fused original module back to all of its parts (:meth:`problems`)."""

    pairs: tuple
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = tuple(p if isinstance(p, Rule) else Rule((p[0],), p[1]) for p in self.pairs)
        compiled = tuple(
            (r, tuple(_template_regex(d) for d in r.diffusers), tuple(_template_regex(d, "_") for d in r.diffusers),
             _template_regex(r.original), _template_regex(r.original, "_"))
            for r in rules
        )
        object.__setattr__(self, "_compiled", compiled)

    def to_original(self, name: str) -> str | None:
        """Diffusers module name -> original name (of the fused module, for a part), or None."""
        for rule, d_res, _, _, _ in self._compiled:
            for d_re in d_res:
                if m := d_re.match(name):
                    return rule.original.format(**m.groupdict())
        return None

    def match(self, original: str) -> Match | None:
        """Original module name -> its :class:`Match`, or None if no entry covers it."""
        for rule, _, _, o_re, _ in self._compiled:
            if m := o_re.match(original):
                return Match(rule, tuple(d.format(**m.groupdict()) for d in rule.diffusers), original)
        return None

    def to_diffusers(self, name: str) -> str | None:
        """Original module name -> diffusers name, or None if no entry covers it or it is fused
        (see :meth:`match` for the parts)."""
        found = self.match(name)
        return found.names[0] if found and not found.rule.fused else None

    def match_flat(self, flat: str) -> Match | None:
        """A kohya name body (``blocks_0_self_attn_q``: original naming, or diffusers naming, with
        ``_`` for ``.``) -> its :class:`Match`, or None."""
        for rule, _, _, _, o_flat in self._compiled:
            if m := o_flat.match(flat):
                g = m.groupdict()
                return Match(rule, tuple(d.format(**g) for d in rule.diffusers), rule.original.format(**g))
        for rule, _, d_flats, _, _ in self._compiled:
            for d, d_flat in zip(rule.diffusers, d_flats):
                if m := d_flat.match(flat):
                    name = d.format(**m.groupdict())
                    return Match(Rule((d,), rule.original, embedding=rule.embedding), (name,), name)
        return None

    def from_flat(self, flat: str) -> str | None:
        """A kohya name body -> diffusers module name, or None (also for a fused original)."""
        found = self.match_flat(flat)
        return found.names[0] if found and len(found.names) == 1 else None

    def problems(self, module_names: list[str]) -> list[str]:
        """Why this map does not cover ``module_names`` (diffusers names) one to one; empty if it
        does. A fused original module counts as one key for all its parts, which must all be in
        ``module_names``."""
        out, seen, known, lacking = [], {}, set(module_names), set()
        for name in module_names:
            orig = self.to_original(name)
            if orig is None:
                out.append(f"{name}: no original name")
                continue
            if orig in seen and not self._same_fused(orig, name, seen[orig]):
                out.append(f"{name} and {seen[orig]} both map to {orig}")
            seen[orig] = name
            back = self.match(orig)
            if back is None or name not in back.names:
                out.append(f"{name} -> {orig} -> {back and back.names}: does not map back")
            elif back.rule.fused and not known.issuperset(back.names) and orig not in lacking:
                lacking.add(orig)
                out.append(f"{orig} fuses {', '.join(back.names)}, but the model lacks "
                           f"{', '.join(n for n in back.names if n not in known)}")
            flat = self.match_flat(orig.replace(".", "_"))
            if flat is None or back is None or flat.names != back.names:
                out.append(f"{name}: kohya name lora_unet_{orig.replace('.', '_')} does not map back")
        return out

    def _same_fused(self, orig: str, a: str, b: str) -> bool:
        found = self.match(orig)
        return found is not None and found.rule.fused and a in found.names and b in found.names


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` that peft can put a LoRA on (linear, conv, embedding), the
    same whether or not an adapter is attached (peft's own layers are left out)."""
    out = []
    for n, m in model.named_modules():
        parts = n.split(".")
        if not n or not isinstance(m, _ADAPTABLE) or any(p.startswith(("lora_", "modules_to_save")) for p in parts):
            continue
        out.append(n.removesuffix(".base_layer"))
    return out


def comfyui_weight_name(weight_name: str) -> str:
    """ComfyUI file name beside a diffusers adapter file: ``pytorch_lora_weights.safetensors``
    -> ``comfyui_lora.safetensors``; ``pytorch_lora_weights_<x>.safetensors`` (another
    transformer's adapter) -> ``comfyui_lora_<x>.safetensors``."""
    stem = Path(weight_name).name.removesuffix(".safetensors")
    rest = stem.removeprefix("pytorch_lora_weights")
    return f"comfyui_lora{rest}.safetensors" if rest != stem else f"comfyui_{stem}.safetensors"


# ---------------------------------------------------------------------------- the adapter in module terms


@dataclass
class LoraModule:
    """One adapted module: down = lora_A [r, in, ...], up = lora_B [out, r, ...]; for an
    embedding, peft's lora_embedding_A [r, num] and lora_embedding_B [dim, r]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class Lora:
    """A LoRA for one transformer, keyed by diffusers module name (no ``transformer.`` prefix).
    ``info``: the run description the file records (video_lora.json fields), or {}."""

    modules: dict[str, LoraModule]
    layout: str = "diffusers"
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The most common rank (peft's ``r``; others go in ``rank_pattern``)."""
        return Counter(m.rank for m in self.modules.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        """The most common alpha (peft's ``lora_alpha``; others go in ``alpha_pattern``)."""
        return Counter(m.alpha for m in self.modules.values()).most_common(1)[0][0]

    def peft_config(self) -> dict:
        """Keyword arguments of ``peft.LoraConfig`` that recreate this adapter's shape: exact module
        names as targets, the common rank and alpha, patterns for modules that differ."""
        r, a = self.rank, self.alpha
        # Anchored so a pattern names one module, not every module ending the same way.
        return dict(
            r=r, lora_alpha=a, target_modules=sorted(self.modules),
            rank_pattern={f"^{re.escape(n)}": m.rank for n, m in self.modules.items() if m.rank != r},
            alpha_pattern={f"^{re.escape(n)}": m.alpha for n, m in self.modules.items() if m.alpha != a},
        )

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``<m>.lora_A.weight`` / ``<m>.lora_B.weight`` (``<m>.lora_embedding_A`` / ``_B`` for an
        embedding): what peft's set_peft_model_state_dict takes."""
        out = {}
        for name, m in self.modules.items():
            a, b = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
            out[f"{name}.{a}"] = m.down
            out[f"{name}.{b}"] = m.up
        return out

    def state_dict(self, layout: str, key_map: KeyMap, prefix: str = "transformer") -> dict[str, torch.Tensor]:
        """Tensors named for ``layout``; diffusers names get ``prefix``. Fused original modules get
        one down/up/alpha for their adapted parts (:func:`fuse`). Raises LoraFormatError naming
        the modules ``key_map`` cannot rename."""
        return self._named(layout, key_map, prefix)[0]

    def _named(self, layout: str, key_map: KeyMap, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, fused record): the record lists, per fused original module, the parts in
        its rank columns and their ranks, so our own files split back exactly."""
        if layout == "diffusers":
            return {f"{prefix}.{k}": v for k, v in self.peft_state_dict().items()}, {}
        if layout not in LAYOUTS:
            raise LoraFormatError(f"unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        missing = [n for n in self.modules if key_map.to_original(n) is None]
        if missing:
            raise LoraFormatError(f"{len(missing)} of {len(self.modules)} adapted modules have no name in the "
                                  f"original checkpoint: {', '.join(missing[:3])}; add them to the family's "
                                  f"comfyui_key_map")
        out, record, done = {}, {}, set()
        for name in self.modules:
            orig = key_map.to_original(name)
            if orig in done:
                continue
            done.add(orig)
            found = key_map.match(orig)
            if found.rule.fused:
                down, up, alpha, record[orig] = fuse(found, self.modules)
            else:
                m = self.modules[name]
                (down, up), alpha = to_original_factors(found.rule, m.down, m.up), m.alpha
            if layout == "comfyui":
                head, a, b = f"diffusion_model.{orig}", "lora_A", "lora_B"
            else:
                head, a, b = f"lora_unet_{orig.replace('.', '_')}", "lora_down", "lora_up"
            out[f"{head}.{a}.weight"] = down
            out[f"{head}.{b}.weight"] = up
            out[f"{head}.alpha"] = torch.tensor(float(alpha))
        return out, record


# ---------------------------------------------------------------------------- fused and reordered modules
# Written by hand: peft and diffusers convert whole checkpoints, not LoRA factors, between
# fused and split layouts (diffusers' HunyuanVideo LoRA converter splits fused files one way only).


def to_original_factors(rule: Rule, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-to-one module's (down, up) in diffusers/peft orientation -> as the original module
    takes them (rows reordered, embeddings as [num, r] @ [r, dim])."""
    if rule.embedding:
        return up.T.contiguous(), down.T.contiguous()
    if rule.reordered:
        up = _to_original_rows(rule, [up], [up.shape[0]])
    return down, up


def from_original_factors(rule: Rule, down: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`to_original_factors`."""
    if rule.embedding:
        return up.T.contiguous(), down.T.contiguous()
    if rule.reordered:
        up = _from_original_rows(rule, up, [up.shape[0]])[0]
    return down, up


def _to_original_rows(rule: Rule, ups: list[torch.Tensor], widths: list[int]) -> torch.Tensor:
    """Per-part row blocks ups[j] [widths[j], ...] -> the original's rows (:class:`Rule` pieces)."""
    chunks = [u.split(w // rule.chunks, dim=0) for u, w in zip(ups, widths)]
    return torch.cat([chunks[j][k] for j, k in rule.pieces], dim=0)


def _from_original_rows(rule: Rule, up: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    """The inverse of :func:`_to_original_rows`: the original's rows -> per-part row blocks."""
    pieces = up.split([widths[j] // rule.chunks for j, _ in rule.pieces], dim=0)
    by_part = dict(zip(rule.pieces, pieces))
    return [torch.cat([by_part[(j, k)] for k in range(rule.chunks)], dim=0) for j in range(len(widths))]


def fuse(found: Match, modules: dict[str, LoraModule]) -> tuple[torch.Tensor, torch.Tensor, float, list]:
    """The adapted parts of a fused original module as one LoRA on it, exactly: down [R, in] is the
    parts' downs stacked (R = sum of their ranks), up [out, R] is block diagonal (part j's up in
    its own rows and rank columns, zeros elsewhere, also for parts not adapted), so up @ down
    stacks the parts' updates. With one scale alpha_j / r_j for every part, alpha = that scale x R
    (alpha x N for N parts of one rank) and the ups are stored as they are; otherwise alpha = R
    and each up carries its own scale. Returns (down, up, alpha, [[part, rank], ...])."""
    present = [n for n in found.names if n in modules]
    widths = _part_widths(found, {n: modules[n].up.shape[0] for n in present})
    first = modules[present[0]]
    total = sum(modules[n].rank for n in present)
    same_scale = all(modules[n].alpha * first.rank == first.alpha * modules[n].rank for n in present)
    alpha = first.alpha * total / first.rank if same_scale else float(total)
    blocks, col = [], 0
    for name, width in zip(found.names, widths):
        block = first.up.new_zeros((width, total, *first.up.shape[2:]))
        if name in modules:
            m = modules[name]
            block[:, col:col + m.rank] = m.up if same_scale else m.up * (m.alpha / m.rank)
            col += m.rank
        blocks.append(block)
    up = _to_original_rows(found.rule, blocks, widths)
    down = torch.cat([modules[n].down for n in present], dim=0)
    return down, up, alpha, [[n, modules[n].rank] for n in present]


def unfuse(found: Match, down: torch.Tensor, up: torch.Tensor, alpha: float,
           recorded: list | None = None) -> dict[str, LoraModule]:
    """One LoRA on a fused original module -> one per diffusers part, with the same update
    up @ down x alpha / R on each part's rows. Exact inverse of :func:`fuse` when the file records
    its parts (our files) or is block diagonal with one rank per part (``fuse`` of every part);
    otherwise (a full-rank LoRA from another tool) every part gets the same down and its rows of
    up, rank R and the file's alpha. Raises LoraFormatError if the rows do not split."""
    total = int(down.shape[0])
    widths = _part_widths(found, {}, int(up.shape[0]))
    rows = dict(zip(found.names, _from_original_rows(found.rule, up, widths)))
    if recorded and {n for n, _ in recorded} <= set(found.names):
        out, col = {}, 0
        for name, rank in recorded:
            out[name] = LoraModule(down[col:col + rank].clone(), rows[name][:, col:col + rank].clone(),
                                   alpha * rank / total)
            col += rank
        return out
    n = len(found.names)
    if total % n == 0:
        r = total // n
        blocks = [rows[name][:, j * r:(j + 1) * r] for j, name in enumerate(found.names)]
        outside = [torch.cat([rows[name][:, :j * r], rows[name][:, (j + 1) * r:]], dim=1)
                   for j, name in enumerate(found.names)]
        if not any(o.any() for o in outside):
            return {name: LoraModule(down[j * r:(j + 1) * r].clone(), blocks[j].clone(), alpha / n)
                    for j, name in enumerate(found.names)}
    return {name: LoraModule(down.clone(), rows[name].clone(), alpha) for name in found.names}


def _part_widths(found: Match, known: dict[str, int], total: int | None = None) -> list[int]:
    """Output rows of each part of a fused module, from the widths of adapted parts (``known``)
    or the fused module's ``total``, and the rule's relative sizes."""
    sizes = tuple(s * found.rule.chunks for s in found.rule.sizes or (1,) * len(found.names))
    if known:
        name, width = next(iter(known.items()))
        unit, rest = divmod(width, sizes[found.names.index(name)])
    else:
        unit, rest = divmod(total, sum(sizes))
    if rest:
        raise LoraFormatError(f"{found.original}: {total if total is not None else width} output rows do not split "
                              f"into {', '.join(found.names)} in proportions {sizes}")
    return [unit * s for s in sizes]


def lora_from_peft(state: dict[str, torch.Tensor], config: dict) -> Lora:
    """A Lora from ``get_peft_model_state_dict`` output and its adapter's ``peft_config`` dict."""
    from peft.utils.other import get_pattern_key  # peft's own rule for rank/alpha patterns

    modules, pat, default = {}, config.get("alpha_pattern") or {}, config["lora_alpha"]
    for key, down in state.items():
        for a, b, emb in ((".lora_A.weight", ".lora_B.weight", False),
                          (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a):
                name = key.removesuffix(a)
                alpha = pat.get(get_pattern_key(pat.keys(), name), default) if pat else default
                modules[name] = LoraModule(down, state[f"{name}{b}"], float(alpha), emb)
    return Lora(modules)


def export_comfyui(transformer: torch.nn.Module, key_map: KeyMap, path: str | Path, info: dict | None = None,
                   adapter_name: str = "default") -> Path:
    """Write the peft adapter ``adapter_name`` of ``transformer`` (unwrapped) to ``path`` in ComfyUI
    naming, with ``info`` (the run description) in its metadata so ``infer.py --lora <file>``
    finds the base model. A model with two transformers calls this once per transformer, each
    with its own key map and file (see :func:`comfyui_weight_name`)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
    lora = lora_from_peft(state, transformer.peft_config[adapter_name].to_dict())
    lora.info = dict(info or {})
    return write_lora(lora, path, "comfyui", key_map)


# ---------------------------------------------------------------------------- reading


def require_readable(path: str | Path) -> None:
    """Raise AdapterError unless ``path`` is a safetensors file whose header reads (cheap: the
    tensors are not loaded). The header must cover the whole file, so a truncated copy fails."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found (a finished run folder holds it; pass the output.dir of "
                           f"a completed train_lora.py run, or the .safetensors file itself)")
    problem = safetensors_problem(path)
    if problem:
        raise AdapterError(f"{path}: not a readable safetensors file ({problem}); the file is damaged or in another "
                           f"format: copy it again, re-export it, or retrain (--resume latest from its last "
                           f"checkpoint)")


def safetensors_problem(path: str | Path) -> str | None:
    """Why the safetensors file at ``path`` cannot be read (short, for messages), or None."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
        return None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format
        return "a torch.save pickle; convert it to .safetensors" if zipped else str(e)



_DIFFUSERS_KEY = re.compile(r"(?P<m>.+)\.(?:lora_(?P<ab>[AB])(?:\.default)?\.weight|lora_embedding_(?P<eab>[AB])"
                            r"(?:\.default)?|(?P<alpha>alpha))\Z")
_COMFY_KEY = re.compile(r"(?P<m>.+)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)\.weight|(?P<alpha>alpha))\Z")
# safetensors metadata key of the files we write: per fused original module, its parts and ranks.
FUSED_KEY = "video_lora_fused"


def _parse(layout: str, key: str, key_map: KeyMap, prefix: str) -> tuple[Match, str] | None:
    """``key`` -> (what module it belongs to, "A" | "B" | "alpha") in ``layout``, or None."""
    if layout == "diffusers":
        for p in (f"{prefix}.", *_PEFT_PREFIXES, ""):
            if key.startswith(p) and (m := _DIFFUSERS_KEY.match(key[len(p):])):
                name = m["m"]
                if key_map.to_original(name) is not None:
                    rule = Rule((name,), name, embedding=m["eab"] is not None)
                    return Match(rule, (name,), name), "alpha" if m["alpha"] else (m["ab"] or m["eab"])
        return None
    prefixes = _COMFY_PREFIXES if layout == "comfyui" else _KOHYA_PREFIXES
    for p in prefixes:
        if key.startswith(p) and (m := _COMFY_KEY.match(key[len(p):])):
            found = key_map.match(m["m"]) if layout == "comfyui" else key_map.match_flat(m["m"])
            if found is not None:
                part = "alpha" if m["alpha"] else ("A" if m["ab"] in ("lora_A", "lora_down") else "B")
                return found, part
    return None


def lora_from_state_dict(state: dict[str, torch.Tensor], key_map: KeyMap, metadata: dict | None = None,
                         prefix: str = "transformer", source: str = "state dict") -> Lora:
    """Recognise the layout of ``state`` and convert it; fused original modules split into their
    diffusers parts (:func:`unfuse`). Raises LoraFormatError if no layout covers every key
    (counting the keys each layout recognises) or a module lacks A or B."""
    if not state:
        raise LoraFormatError(f"{source}: no tensors in the file")
    counts = {lay: sum(_parse(lay, k, key_map, prefix) is not None for k in state) for lay in LAYOUTS}
    layout = max(LAYOUTS, key=lambda lay: counts[lay])
    if counts[layout] < len(state):
        stray = [k for k in state if _parse(layout, k, key_map, prefix) is None]
        found = ", ".join(f"{counts[lay]} in {lay} naming" for lay in LAYOUTS)
        raise LoraFormatError(
            f"{source}: not a LoRA for this model in a known layout: of {len(state)} keys, {found}; "
            f"unrecognised: {', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}. Check --family, or convert "
            f"the file with the tool that made it to diffusers, ComfyUI (diffusion_model.*) or kohya (lora_unet_*) "
            f"naming"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    matches: dict[str, Match] = {}
    for k, v in state.items():
        found, part = _parse(layout, k, key_map, prefix)
        parts.setdefault(found.original, {})[part] = v
        matches[found.original] = found
    half = [n for n, p in parts.items() if "A" not in p or "B" not in p]
    if half:
        raise LoraFormatError(f"{source}: {len(half)} modules lack their lora_A or lora_B weight: "
                              f"{', '.join(half[:3])}")
    alphas = _diffusers_alphas(parts, metadata, prefix) if layout == "diffusers" else {}
    recorded = json.loads(metadata[FUSED_KEY]) if metadata and FUSED_KEY in metadata else {}
    modules = {}
    for orig, p in sorted(parts.items()):
        found, rank = matches[orig], int(p["A"].shape[0])
        alpha = float(p["alpha"].item()) if "alpha" in p else alphas.get(orig, float(rank))
        if found.rule.fused:
            modules.update(unfuse(found, p["A"], p["B"], alpha, recorded.get(orig)))
            continue
        down, up = (p["A"], p["B"]) if layout == "diffusers" else from_original_factors(found.rule, p["A"], p["B"])
        name = found.names[found.rule.choose(up.shape[0], down.shape[1]) if found.rule.choose else 0]
        modules[name] = LoraModule(down, up, alpha, found.rule.embedding)
    info = json.loads(metadata[INFO_KEY]) if metadata and INFO_KEY in metadata else {}
    return Lora(dict(sorted(modules.items())), layout, info)


def _diffusers_alphas(parts: dict, metadata: dict | None, prefix: str) -> dict[str, float]:
    """Alpha per module from diffusers' ``lora_adapter_metadata`` ({} without it: alpha = rank)."""
    from peft.utils.other import get_pattern_key

    if not metadata or ADAPTER_METADATA_KEY not in metadata:
        return {}
    meta = json.loads(metadata[ADAPTER_METADATA_KEY])
    meta = {k.removeprefix(f"{prefix}."): v for k, v in meta.items()}
    if "lora_alpha" not in meta:
        return {}
    pattern = meta.get("alpha_pattern") or {}
    return {n: float(pattern.get(get_pattern_key(pattern.keys(), n), meta["lora_alpha"])) for n in parts}


def read_lora(path: str | Path, key_map: KeyMap, prefix: str = "transformer") -> Lora:
    """Read a LoRA safetensors file in any known layout, or a run folder's adapter. Raises LoraFormatError."""
    path = Path(path)
    if path.is_dir() and (path / "video_lora.json").is_file():
        path = path / json.loads((path / "video_lora.json").read_text())["weight_name"]
    if not path.is_file():
        raise LoraFormatError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: LoRA files are read as .safetensors only (pickled .pt/.ckpt files can run "
                              f"code when loaded); convert it to safetensors first")
    require_readable(path)  # damaged or truncated: AdapterError naming the file, not a SafetensorError
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return lora_from_state_dict(state, key_map, metadata, prefix, source=str(path))


def read_info(path: str | Path) -> dict:
    """The run description a LoRA file records (its ``video_lora`` metadata), or {}."""
    require_readable(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[INFO_KEY]) if INFO_KEY in meta else {}


# ---------------------------------------------------------------------------- writing


def write_lora(lora: Lora, path: str | Path, layout: str, key_map: KeyMap, pipeline_class: type | None = None,
               prefix: str = "transformer") -> Path:
    """Write ``lora`` to ``path`` in ``layout``, atomically. Diffusers files carry rank and alpha as
    adapter metadata (``pipeline_class`` is unused, kept for callers); every file also records
    ``lora.info`` under the ``video_lora`` metadata key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {INFO_KEY: json.dumps(lora.info, default=str)} if lora.info else {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-lora-") as tmp:
        out = Path(tmp) / path.name
        if layout == "diffusers":
            # Same format as the run folder's adapter (finetune.export), written without a
            # pipeline so families whose pipeline has no LoRA saver get the same file.
            from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

            config = {f"{prefix}.{k}": v for k, v in lora.peft_config().items()}
            tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in lora.peft_state_dict().items()}
            save_file(tensors, str(out), metadata={"format": "pt", **info,
                                                   LORA_ADAPTER_METADATA_KEY: json.dumps(config, sort_keys=True)})
        else:
            named, fused_parts = lora._named(layout, key_map, prefix)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in named.items()}
            # ComfyUI ignores metadata; our reader uses the fused record to split back exactly.
            record = {FUSED_KEY: json.dumps(fused_parts)} if fused_parts else {}
            save_file(tensors, str(out), metadata={"format": "pt", **info, **record})
        os.replace(out, path)
    path.chmod(0o644)
    return path


def convert_file(src: str | Path, dst: str | Path, layout: str, key_map: KeyMap, pipeline_class: type,
                 info: dict | None = None) -> Lora:
    """Read ``src`` in any known layout and write it to ``dst`` in ``layout``; ``info`` fills a
    missing run description. Returns the adapter. Raises LoraFormatError."""
    if layout not in LAYOUTS:
        raise LoraFormatError(f"--to {layout}: use one of {', '.join(LAYOUTS)}")
    lora = read_lora(src, key_map)
    if not lora.info and info:
        lora.info = dict(info)
    write_lora(lora, dst, layout, key_map, pipeline_class)
    return lora


# ---------------------------------------------------------------------------- using a file


def _covered(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module name, or its dotted suffix."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _misfits(m: LoraModule, weight: torch.Tensor) -> bool:
    """Whether ``m`` cannot apply to a module with ``weight`` [out, in, ...] ([num, dim] for an embedding)."""
    if m.embedding:
        return m.down.shape[1] != weight.shape[0] or m.up.shape[0] != weight.shape[1]
    return m.down.shape[1] != weight.shape[1] or m.up.shape[0] != weight.shape[0]


def add_lora_from_file(transformer: torch.nn.Module, lora_cfg, targets: list[str], key_map: KeyMap,
                       adapter_name: str = "default") -> Lora:
    """Attach a peft adapter shaped like the LoRA file ``lora_cfg.init_from`` (rank, alpha and
    modules from the file) and load its weights, so training continues from it.

    ``lora_cfg``: the recipe's ``lora`` section; a rank, alpha or targets set there explicitly
    must agree with the file. Raises LoraFormatError listing every disagreement, or modules of
    the file the transformer lacks or has in another shape."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import set_peft_model_state_dict

    where = f"lora.init_from={lora_cfg.init_from}"
    lora = read_lora(lora_cfg.init_from, key_map)
    given, problems = lora_cfg.model_fields_set, []
    if "rank" in given and lora_cfg.rank != lora.rank:
        problems.append(f"the file has rank {lora.rank} but lora.rank={lora_cfg.rank} "
                        f"(remove lora.rank or set {lora.rank})")
    if "alpha" in given and lora_cfg.alpha != lora.alpha:
        problems.append(f"the file has alpha {lora.alpha:g} but lora.alpha={lora_cfg.alpha:g} "
                        f"(remove lora.alpha or set {lora.alpha:g})")
    modules = dict(transformer.named_modules())
    if "targets" in given:
        wanted = {n for n in adaptable_modules(transformer) if _covered(n, targets)}
        if wanted != set(lora.modules):
            problems.append(f"lora.targets adapt {len(wanted)} modules but the file has {len(lora.modules)} "
                            f"(remove lora.targets to use the file's)")
    absent = [n for n in lora.modules if n not in modules]
    if absent:
        problems.append(f"{len(absent)} of the file's modules are not in this model: {', '.join(absent[:3])} "
                        f"(is model.family / model.pretrained the base model the LoRA was made for?)")
    misfit = [n for n, m in lora.modules.items() if n in modules and hasattr(modules[n], "weight")
              and _misfits(m, modules[n].weight)]
    if misfit:
        problems.append(f"{len(misfit)} modules have another shape in this model: {', '.join(misfit[:3])} "
                        f"(a LoRA for another model size?)")
    if problems:
        raise LoraFormatError(f"{where}: " + "; ".join(problems))
    transformer.add_adapter(PeftLoraConfig(**lora.peft_config(), lora_dropout=lora_cfg.dropout, init_lora_weights=True),
                            adapter_name=adapter_name)
    dtype = next(p for n, p in transformer.named_parameters() if "lora_A" in n).dtype
    result = set_peft_model_state_dict(transformer, {k: v.to(dtype) for k, v in lora.peft_state_dict().items()},
                                       adapter_name=adapter_name)
    if result.unexpected_keys:
        raise LoraFormatError(f"{where}: {len(result.unexpected_keys)} weights did not load: "
                              f"{', '.join(result.unexpected_keys[:3])}")
    return lora
