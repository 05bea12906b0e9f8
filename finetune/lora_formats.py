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
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from finetune.adapters import require_readable
from finetune.errors import UserError

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
class KeyMap:
    """Renames between a transformer's diffusers module names and the original checkpoint's.

    ``pairs``: (diffusers template, original template), e.g. ``("blocks.{i}.attn1.to_q",
    "blocks.{i}.self_attn.q")``; ``{field}`` stands for a block number and must appear on both
    sides. The first pair that matches a name wins. A map is complete for a model when every
    adaptable module name maps to exactly one original name and back (:meth:`problems`)."""

    pairs: tuple[tuple[str, str], ...]
    _compiled: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = tuple(
            (_template_regex(d), _template_regex(o), _template_regex(o, "_"), _template_regex(d, "_"), d, o)
            for d, o in self.pairs
        )
        object.__setattr__(self, "_compiled", compiled)

    def to_original(self, name: str) -> str | None:
        """Diffusers module name -> original name, or None if no pair covers it."""
        for d_re, _, _, _, _, o in self._compiled:
            if m := d_re.match(name):
                return o.format(**m.groupdict())
        return None

    def to_diffusers(self, name: str) -> str | None:
        """Original module name -> diffusers name, or None if no pair covers it."""
        for _, o_re, _, _, d, _ in self._compiled:
            if m := o_re.match(name):
                return d.format(**m.groupdict())
        return None

    def from_flat(self, flat: str) -> str | None:
        """A kohya name body (``blocks_0_self_attn_q``: original naming, or diffusers naming, with
        ``_`` for ``.``) -> diffusers module name, or None."""
        for _, _, o_flat, d_flat, d, _ in self._compiled:
            if (m := o_flat.match(flat)) or (m := d_flat.match(flat)):
                return d.format(**m.groupdict())
        return None

    def problems(self, module_names: list[str]) -> list[str]:
        """Why this map is not a bijection on ``module_names`` (diffusers names); empty if it is."""
        out, seen = [], {}
        for name in module_names:
            orig = self.to_original(name)
            if orig is None:
                out.append(f"{name}: no original name")
                continue
            if orig in seen:
                out.append(f"{name} and {seen[orig]} both map to {orig}")
            seen[orig] = name
            back = self.to_diffusers(orig)
            if back != name:
                out.append(f"{name} -> {orig} -> {back}: does not map back")
            if self.from_flat(orig.replace(".", "_")) != name:
                out.append(f"{name}: kohya name lora_unet_{orig.replace('.', '_')} does not map back")
        return out


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
    """One adapted module: down = lora_A [r, in, ...], up = lora_B [out, r, ...]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

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
        """``<m>.lora_A.weight`` / ``<m>.lora_B.weight``: what peft's set_peft_model_state_dict takes."""
        out = {}
        for name, m in self.modules.items():
            out[f"{name}.lora_A.weight"] = m.down
            out[f"{name}.lora_B.weight"] = m.up
        return out

    def state_dict(self, layout: str, key_map: KeyMap, prefix: str = "transformer") -> dict[str, torch.Tensor]:
        """Tensors named for ``layout``; diffusers names get ``prefix``. Raises LoraFormatError
        naming the modules ``key_map`` cannot rename."""
        if layout == "diffusers":
            return {f"{prefix}.{k}": v for k, v in self.peft_state_dict().items()}
        if layout not in LAYOUTS:
            raise LoraFormatError(f"unknown LoRA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        missing = [n for n in self.modules if key_map.to_original(n) is None]
        if missing:
            raise LoraFormatError(f"{len(missing)} of {len(self.modules)} adapted modules have no name in the "
                                  f"original checkpoint: {', '.join(missing[:3])}; add them to the family's "
                                  f"comfyui_key_map")
        out = {}
        for name, m in self.modules.items():
            orig = key_map.to_original(name)
            if layout == "comfyui":
                head, a, b = f"diffusion_model.{orig}", "lora_A", "lora_B"
            else:
                head, a, b = f"lora_unet_{orig.replace('.', '_')}", "lora_down", "lora_up"
            out[f"{head}.{a}.weight"] = m.down
            out[f"{head}.{b}.weight"] = m.up
            out[f"{head}.alpha"] = torch.tensor(float(m.alpha))
        return out


def lora_from_peft(state: dict[str, torch.Tensor], config: dict) -> Lora:
    """A Lora from ``get_peft_model_state_dict`` output and its adapter's ``peft_config`` dict."""
    from peft.utils.other import get_pattern_key  # peft's own rule for rank/alpha patterns

    modules = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removesuffix(".lora_A.weight")
            pat = config.get("alpha_pattern") or {}
            alpha = pat.get(get_pattern_key(pat.keys(), name), config["lora_alpha"]) if pat else config["lora_alpha"]
            modules[name] = LoraModule(down, state[f"{name}.lora_B.weight"], float(alpha))
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


_DIFFUSERS_KEY = re.compile(r"(?P<m>.+)\.(?:lora_(?P<ab>[AB])(?:\.default)?\.weight|(?P<alpha>alpha))\Z")
_COMFY_KEY = re.compile(r"(?P<m>.+)\.(?:(?P<ab>lora_A|lora_B|lora_down|lora_up)\.weight|(?P<alpha>alpha))\Z")


def _parse(layout: str, key: str, key_map: KeyMap, prefix: str) -> tuple[str, str] | None:
    """``key`` -> (diffusers module name, "A" | "B" | "alpha") in ``layout``, or None."""
    if layout == "diffusers":
        for p in (f"{prefix}.", *_PEFT_PREFIXES, ""):
            if key.startswith(p) and (m := _DIFFUSERS_KEY.match(key[len(p):])):
                if key_map.to_original(m["m"]) is not None:
                    return m["m"], "alpha" if m["alpha"] else m["ab"]
        return None
    prefixes = _COMFY_PREFIXES if layout == "comfyui" else _KOHYA_PREFIXES
    for p in prefixes:
        if key.startswith(p) and (m := _COMFY_KEY.match(key[len(p):])):
            name = key_map.to_diffusers(m["m"]) if layout == "comfyui" else key_map.from_flat(m["m"])
            if name is not None:
                part = "alpha" if m["alpha"] else ("A" if m["ab"] in ("lora_A", "lora_down") else "B")
                return name, part
    return None


def lora_from_state_dict(state: dict[str, torch.Tensor], key_map: KeyMap, metadata: dict | None = None,
                         prefix: str = "transformer", source: str = "state dict") -> Lora:
    """Recognise the layout of ``state`` and convert it. Raises LoraFormatError if no layout
    covers every key (counting the keys each layout recognises) or a module lacks A or B."""
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
    for k, v in state.items():
        name, part = _parse(layout, k, key_map, prefix)
        parts.setdefault(name, {})[part] = v
    half = [n for n, p in parts.items() if "A" not in p or "B" not in p]
    if half:
        raise LoraFormatError(f"{source}: {len(half)} modules lack their lora_A or lora_B weight: "
                              f"{', '.join(half[:3])}")
    alphas = _diffusers_alphas(parts, metadata, prefix) if layout == "diffusers" else {}
    modules = {}
    for name, p in sorted(parts.items()):
        rank = int(p["A"].shape[0])
        alpha = float(p["alpha"].item()) if "alpha" in p else alphas.get(name, float(rank))
        modules[name] = LoraModule(p["A"], p["B"], alpha)
    info = json.loads(metadata[INFO_KEY]) if metadata and INFO_KEY in metadata else {}
    return Lora(modules, layout, info)


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
            named = lora.state_dict(layout, key_map, prefix)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in named.items()}
            save_file(tensors, str(out), metadata={"format": "pt", **info})
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
              and (m.down.shape[1] != modules[n].weight.shape[1] or m.up.shape[0] != modules[n].weight.shape[0])]
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
