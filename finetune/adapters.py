"""Reading LoRA adapter files defensively: a missing, damaged, non-safetensors or foreign file
is an :class:`AdapterError` naming the file and what to do, never a raw ``OSError`` or
``SafetensorError`` from deep inside a loader. Used wherever an adapter file comes from a user:
``infer.py --lora``, resume, adapter import and ``lora.init_from``. The header check itself
(:func:`finetune.lora_formats.require_readable`) lives with the LoRA layouts, which read files too."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from finetune.errors import AdapterError
from finetune.lora_formats import require_readable

# Substrings of LoRA weight names in the formats in use (PEFT/diffusers, kohya/ComfyUI, ...).
LORA_KEY_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_mid")


def read_adapter_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors LoRA file at ``path``, on the CPU.

    Raises AdapterError if the file is missing, is not a readable safetensors file (truncated,
    damaged, a pickle ``.bin`` or ``.ckpt``), or holds no LoRA weights (a full model, say).
    """
    path = Path(path)
    require_readable(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    if not state:
        raise AdapterError(f"{path}: the file holds no tensors; it is not a LoRA adapter")
    lora = [k for k in state if any(m in k for m in LORA_KEY_MARKS)]
    if not lora:
        shown = ", ".join(list(state)[:3])
        raise AdapterError(f"{path}: no LoRA weights in it ({len(state)} tensors, e.g. {shown}); it looks like "
                           f"another kind of model file, not a LoRA adapter")
    return state
