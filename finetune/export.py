"""The run folder's final adapter, in the diffusers LoRA format, and the JSON that makes the
folder describe itself:

  <run>/pytorch_lora_weights.safetensors   LoRA weights + adapter metadata (rank, alpha, targets)
  <run>/pytorch_lora_weights_transformer_2.safetensors   the second expert's (two-expert models)
  <run>/video_lora.json                    base model id and revision, family, task, trigger words,
                                           adapter file per transformer, recipe
  <run>/comfyui_lora[_transformer_2].safetensors   the same adapter in the original checkpoint's
                                           module names (ComfyUI), from the family's key map

The files are the diffusers LoRA format (``transformer.``-prefixed PEFT keys, metadata packed
with the same prefix), written here rather than by a pipeline's ``save_lora_weights`` so that
families whose pipeline has no LoRA loader get the same file; ``pipe.load_lora_weights("<run>")``
works on it where the pipeline has one, and ``infer.py --lora <run>`` needs nothing else. The
adapter metadata matters: without it diffusers assumes alpha == rank on reload and the outputs
drift.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from finetune.errors import UserError

if TYPE_CHECKING:
    from finetune.lora_formats import KeyMap

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RUN_INFO = "video_lora.json"


@dataclass(frozen=True)
class RunInfo:
    """What ``video_lora.json`` records about a trained adapter."""

    family: str
    base_model: str
    revision: str | None
    tiny: bool
    tiny_seed: int
    trigger: str
    steps: int
    weight_name: str
    recipe: dict
    task: str = "t2v"
    # Components attribute ("transformer", "transformer_2") -> adapter file in the run folder
    adapters: dict | None = None
    # "random": trained on random full-size weights (model.weights=random) to measure memory and
    # speed; the adapter fits no real model, so publishing refuses it
    weights: str = "pretrained"

    @property
    def usable(self) -> bool:
        """Whether the adapter was trained on real (or tiny test) weights, not random full-size ones."""
        return self.weights != "random"

    def adapter_files(self) -> dict[str, str]:
        return dict(self.adapters) if self.adapters else {"transformer": self.weight_name}

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunInfo":
        """Raises UserError if ``run_dir`` is not a finished run folder."""
        path = Path(run_dir) / RUN_INFO
        if not path.is_file():
            raise UserError(f"{run_dir}: not a trained run folder (no {RUN_INFO}); pass the output.dir of a finished "
                            f"train_lora.py run")
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: damaged run description ({type(e).__name__}: {e}); retrain, or resume the run "
                            f"with train_lora.py ... --resume latest to write it again") from None


def adapter_file_name(attr: str) -> str:
    """Adapter file of the transformer at Components attribute ``attr`` in a run folder."""
    return WEIGHT_NAME if attr == "transformer" else WEIGHT_NAME.replace(".safetensors", f"_{attr}.safetensors")


def lora_file_contents(transformer: torch.nn.Module, adapter_name: str = "default",
                       prefix: str = "transformer") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers-format tensors and safetensors metadata of PEFT adapter ``adapter_name``:
    keys ``<prefix>.<module>.lora_A.weight`` (fp32), metadata ``{"format": "pt",
    "lora_adapter_metadata": json of {"<prefix>.r": ..., "<prefix>.lora_alpha": ..., ...}}``."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    tensors = {f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config = transformer.peft_config[adapter_name].to_dict()
    config = {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return tensors, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True, default=str)}


def save_adapters(transformers: dict[str, torch.nn.Module], run_dir: str | Path, info: RunInfo,
                  comfyui_key_maps: "dict[str, KeyMap] | None" = None) -> list[Path]:
    """Write the adapter of each transformer (unwrapped, PEFT adapter "default"), keyed by its
    Components attribute, into the file ``info.adapters`` names; with ``comfyui_key_maps`` (attr
    -> key map) also each in ComfyUI naming beside it (``comfyui_lora[_<attr>].safetensors``);
    then ``video_lora.json``. Each file is written into a temp folder then renamed into place,
    the description last, so a folder with video_lora.json is always complete."""
    from finetune.lora_formats import comfyui_weight_name, export_comfyui

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = info.adapter_files()
    paths = []
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-adapter-") as tmp:
        written = []
        for attr, transformer in transformers.items():
            tensors, metadata = lora_file_contents(transformer)
            save_file(tensors, str(Path(tmp) / files[attr]), metadata=metadata)
            written.append(files[attr])
            if comfyui_key_maps and attr in comfyui_key_maps:
                comfy = comfyui_weight_name(files[attr])
                export_comfyui(transformer, comfyui_key_maps[attr], Path(tmp) / comfy, info.__dict__)
                written.append(comfy)
        (Path(tmp) / RUN_INFO).write_text(json.dumps(info.__dict__, indent=2, default=str))
        for name in written:
            os.replace(Path(tmp) / name, run_dir / name)
            (run_dir / name).chmod(0o644)  # the temp folder's files are private; an adapter is for sharing
            paths.append(run_dir / name)
        os.replace(Path(tmp) / RUN_INFO, run_dir / RUN_INFO)
    return paths


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m finetune.export SRC --to comfyui|diffusers|kohya --out FILE [--family NAME]``:
    convert a LoRA file (any known layout) or a run folder's adapter between layouts."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m finetune.export", description=main.__doc__)
    p.add_argument("src", type=Path, help="LoRA .safetensors file, or a run folder")
    p.add_argument("--to", required=True, choices=["comfyui", "diffusers", "kohya"], help="layout to write")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--family", help="model family; default: the one the file or run folder records")
    args = p.parse_args(argv)

    from finetune.families import get_family
    from finetune.lora_formats import convert_file, read_info

    src, info = args.src, {}
    if src.is_dir():
        run = RunInfo.read(src)
        src, info = src / run.weight_name, dict(run.__dict__)
    elif src.is_file():
        info = read_info(src)
    else:
        raise UserError(f"{src}: no such file or run folder")
    name = args.family or info.get("family")
    if not name:
        raise UserError(f"{src} does not record its model family; pass --family (e.g. --family wan)")
    try:
        family = get_family(name)
    except KeyError as e:
        raise UserError(f"--family {name}: {e.args[0]}") from None
    lora = convert_file(src, args.out, args.to, family.comfyui_key_map(), family.pipeline_class, info=info)
    print(f"{src} ({lora.layout}, {len(lora.modules)} modules, rank {lora.rank}, alpha {lora.alpha:g}) "
          f"-> {args.out} ({args.to})")
    return 0


if __name__ == "__main__":
    import sys

    from finetune.cli import run_main

    sys.exit(run_main(main))
