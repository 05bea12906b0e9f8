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

import torch
from peft import get_peft_model_state_dict

from finetune.errors import UserError

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
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: damaged run description ({type(e).__name__}: {e}); retrain, or resume the run "
                            f"with train_lora.py ... --resume latest to write it again") from None


def save_adapter(transformer: torch.nn.Module, pipeline_class: type, run_dir: str | Path, info: RunInfo) -> Path:
    """Write the adapter of ``transformer`` (unwrapped, PEFT adapter "default") and ``video_lora.json``
    into ``run_dir``. Each file is written into a temp folder then renamed into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in get_peft_model_state_dict(transformer).items()}
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".tmp-adapter-") as tmp:
        pipeline_class.save_lora_weights(
            tmp, transformer_lora_layers=state, weight_name=WEIGHT_NAME, safe_serialization=True,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
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

