"""The run folder's final adapter, in the diffusers LoRA format, and the JSON that makes the
folder describe itself:

  <run>/pytorch_lora_weights.safetensors   LoRA weights + adapter metadata (rank, alpha, targets)
  <run>/video_lora.json                    base model id and revision, family, trigger words, recipe

``pipe.load_lora_weights("<run>")`` works on it directly; ``infer.py --lora <run>`` needs nothing
else. The adapter metadata matters: without it diffusers assumes alpha == rank on reload and the
outputs drift.
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

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunInfo":
        """Raises UserError if ``run_dir`` is not a finished run folder."""
        path = Path(run_dir) / RUN_INFO
        if not path.is_file():
            raise UserError(f"{run_dir}: not a trained run folder (no {RUN_INFO}); pass the output.dir of a finished "
                            f"train_lora.py run")
        data = json.loads(path.read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def save_adapter(transformer: torch.nn.Module, pipeline_class: type, run_dir: str | Path, info: RunInfo,
                 comfyui_key_map: "KeyMap | None" = None) -> Path:
    """Write the adapter of ``transformer`` (unwrapped, PEFT adapter "default") and ``video_lora.json``
    into ``run_dir``; with ``comfyui_key_map`` also the same adapter in ComfyUI naming
    (``comfyui_lora.safetensors``). Each file is written into a temp folder then renamed into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(transformer).items()}
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-adapter-") as tmp:
        pipeline_class.save_lora_weights(
            tmp, transformer_lora_layers=state, weight_name=WEIGHT_NAME, safe_serialization=True,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
        if comfyui_key_map is not None:
            from finetune.lora_formats import comfyui_weight_name, export_comfyui

            export_comfyui(transformer, comfyui_key_map, run_dir / comfyui_weight_name(WEIGHT_NAME), info.__dict__)
        (Path(tmp) / RUN_INFO).write_text(json.dumps(info.__dict__, indent=2, default=str))
        # Weights first, description last: a folder with video_lora.json is always complete.
        os.replace(Path(tmp) / WEIGHT_NAME, run_dir / WEIGHT_NAME)
        os.replace(Path(tmp) / RUN_INFO, run_dir / RUN_INFO)
    (run_dir / WEIGHT_NAME).chmod(0o644)  # the temp folder's files are private; an adapter is for sharing
    return run_dir / WEIGHT_NAME


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
