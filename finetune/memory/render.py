"""Validation renders within the training budget: each model on the accelerator only while it runs.

During a render (:func:`finetune.trainer.render_samples`) the pipeline runs its models one after
another: the text encoder(s) on the prompts, the transformer(s) over the denoising steps, the VAE
on the latents. :func:`idle_offloaded` puts every model of the family in host memory and lets
accelerate's ``cpu_offload_with_hook`` bring each one to the device when its forward is called,
moving the one before it (in the pipeline's ``model_cpu_offload_seq``) back out, which is how
diffusers' ``enable_model_cpu_offload`` works. The peak of a render is then the largest single
model plus its working memory, not their sum, plus what training keeps there: the optimizer state,
which is not a module and never moves. Decoding is tiled when ``memory.vae_tiling`` says so
(finetune/weights/vae.py), since the VAE is the family's own module.

Text encoders of ``memory.text_encoder=cpu`` never come to the device: they run in host memory
behind an accelerate hook that hands their outputs back on the device the pipeline asked for.
Modules that cannot move (bitsandbytes 8-bit weights) stay where they are.

On leaving, every hook is removed and every module goes back to the device it was on, so the
training state (the adapters inside the transformers, the optimizer and its state, which expert
is where) is what it was before the render.

Hand-written rather than ``pipeline.enable_model_cpu_offload`` because that moves every model to
the device (no host-run text encoder) and re-installs its hooks at the end of each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import cpu_offload_with_hook
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

from finetune.families.base import Family
from finetune.weights.encoders import TEXT_ENCODERS


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s first parameter (else buffer) lives; CPU for an empty module."""
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def pipeline_modules(pipe: Any) -> dict[str, torch.nn.Module]:
    """The torch modules of ``pipe`` by its component names (which may differ from the family's
    Components attributes, and include parts the family keeps elsewhere, such as an audio VAE)."""
    return {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def placement(modules: dict[str, torch.nn.Module]) -> dict[str, torch.device]:
    """Each module by name -> its device."""
    return {name: device_of(m) for name, m in modules.items()}


def _immovable(module: torch.nn.Module) -> bool:
    # diffusers does not move bitsandbytes 8-bit models either (DiffusionPipeline.to); a model
    # under block swap already keeps its swapped blocks in host memory and streams them itself
    return bool(getattr(module, "is_loaded_in_8bit", False)) or getattr(module, "_block_swap", None) is not None


def offload_order(pipe: Any, names: list[str]) -> list[str]:
    """``names`` in the pipeline's run order (``model_cpu_offload_seq``), the rest after."""
    seq = [n for n in (getattr(pipe, "model_cpu_offload_seq", None) or "").split("->") if n in names]
    return seq + [n for n in names if n not in seq]


@contextlib.contextmanager
def idle_offloaded(family: Family, pipe: Any, device: torch.device | str) -> Iterator[list[str]]:
    """While inside, each model of ``pipe`` (built from ``family``'s components) sits in host memory
    and is on ``device`` only while it runs (module docstring). Yields the pipeline component names
    it hooked. Restores hooks and devices on leaving, also after an error."""
    device = torch.device(device)
    modules = pipeline_modules(pipe)
    before = placement(modules)
    host_run = {id(m) for n in TEXT_ENCODERS if family.spec.text_encoder == "cpu"
                and (m := getattr(family.components, n)) is not None}
    hooked: list[str] = []
    try:
        prev = None
        for name in offload_order(pipe, list(modules)):
            m = modules[name]
            if _immovable(m):
                continue
            m.to("cpu")
            if id(m) in host_run:
                add_hook_to_module(m, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
                # so the pipeline takes its execution device from a model that runs on `device`
                pipe._exclude_from_cpu_offload = [*getattr(pipe, "_exclude_from_cpu_offload", []), name]
            else:
                _, prev = cpu_offload_with_hook(m, device, prev_module_hook=prev)
            hooked.append(name)
        yield hooked
    finally:
        for name in hooked:
            remove_hook_from_module(modules[name], recurse=True)
        for name, m in modules.items():
            if device_of(m) != before[name]:
                m.to(before[name])
