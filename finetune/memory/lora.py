"""LoRA layers that train fp32 masters but compute in the activation dtype.

The trainable LoRA weights are float32 (updates this small vanish in bf16), while the frozen base
and the activations are bf16 under autocast. peft's ``lora.Linear`` casts each layer's input to
the LoRA weight dtype before ``lora_A`` (``_cast_input_dtype``): under autocast that makes a
float32 copy of the activation (a transient of twice its size) which autocast then casts back to
bf16, a *new* bf16 tensor that ``lora_A`` saves for backward next to the input the base layer
already saved. Per LoRA layer, one more activation-sized tensor kept until backward.

:func:`train_in_fp32` turns that cast off whenever autocast is on for the input's device (a
forward pre-hook setting peft's own ``cast_input_dtype_enabled`` switch per call, so gradient
checkpointing's recomputation, which restores the autocast state, decides the same): autocast then
runs ``lora_A`` on the very input tensor the base layer saved (the cast of a tensor already in
the autocast dtype is the tensor itself), casting only the small LoRA weights. Outside autocast
(a float32 model on a CPU, ``memory.mixed_precision: no``) peft casts as before, so a bf16 input
meets float32 LoRA weights only after being cast to them.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer


# > 0 while the planner's emulation of CUDA autocast is on (finetune.memory.trace.CudaAutocast),
# which the LoRA layers must treat as autocast, as they treat the real one on the card
_emulated_autocast = 0


def set_emulated_autocast(on: bool) -> None:
    """Enter (``on``) or leave an emulated autocast region (finetune.memory.trace.CudaAutocast)."""
    global _emulated_autocast
    _emulated_autocast += 1 if on else -1


def autocast_on(device_type: str) -> bool:
    """Whether autocast (real, or the planner's emulation) is on for ``device_type``; False for a
    device autocast does not know (the meta device)."""
    if _emulated_autocast:
        return True
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _cast_outside_autocast(layer: LoraLayer, args: tuple) -> None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        layer.cast_input_dtype_enabled = not autocast_on(x.device.type)


def compute_in_activation_dtype(model: torch.nn.Module) -> int:
    """Make every peft LoRA layer of ``model`` skip its input cast under autocast (module
    docstring); idempotent. Returns the number of LoRA layers."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        if not getattr(m, "_casts_outside_autocast", False):
            m.register_forward_pre_hook(_cast_outside_autocast)
            m._casts_outside_autocast = True
    return len(layers)


def train_in_fp32(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters of ``model``, made float32 masters in place, with the LoRA
    layers computing in the activation dtype (:func:`compute_in_activation_dtype`). Returns them
    (for the optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    compute_in_activation_dtype(model)
    return params
