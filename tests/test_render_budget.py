"""Validation renders within the training budget (finetune/memory/render.py): each model on the
device only while it runs, and the training state untouched by a render."""

from __future__ import annotations

import accelerate.hooks
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from finetune import trainer
from finetune.inference import RenderArgs, render
from finetune.memory.render import idle_offloaded, pipeline_modules, placement


def _hooks(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if hasattr(m, "_hf_hook") or hasattr(m, "_old_forward")]


def _optimizer_state(run_dir, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}" / "optimizer.bin", weights_only=False)


def test_training_state_after_renders_equals_a_run_without_them(clips, tmp_path):
    """Renders every step (hooks on, models moved out and back) change neither the adapter nor
    the optimizer: both equal a run that never rendered, bit for bit."""
    common = ("optim.steps=3", "checkpoint.every=2", "validation.steps=2")
    plain = trainer.train(tiny_recipe("wan", clips, tmp_path / "plain", *common))
    rendered = trainer.train(tiny_recipe("wan", clips, tmp_path / "rendered", *common, "validation.every=1",
                                         "validation.prompts=[mystyle a square]"))
    samples = sorted(p.name for p in (tmp_path / "rendered" / "samples").iterdir())
    assert samples == ["base-0.mp4"] + [f"step-{s:08d}-0.mp4" for s in (1, 2, 3)]  # the renders happened
    a, b = load_file(str(plain.adapter)), load_file(str(rendered.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _optimizer_state(tmp_path / "plain", 2), _optimizer_state(tmp_path / "rendered", 2)
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for name, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][name]), (i, name)
    assert not _hooks(rendered.family.components.transformer)


@pytest.mark.parametrize("text_encoder", ["gpu", "cpu"])
def test_each_model_comes_in_as_it_runs_and_everything_goes_back(clips, tmp_path, monkeypatch, text_encoder):
    """Inside the context every pipeline model is hooked, and they come to the device in the
    pipeline's run order (text encoder, transformer, VAE); a host-run text encoder (memory.text_encoder=cpu)
    is never brought in. Afterwards no hook is left and every module is the same object, on the same
    device, with the same values. On a CPU the devices coincide, so what is checked is the hooks,
    their order and the restoration."""
    recipe = tiny_recipe("wan", clips, tmp_path / "run", f"memory.text_encoder={text_encoder}")
    family = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
    trainer.add_lora(family.components.transformer, recipe)
    pipe = family.pipeline()
    modules = pipeline_modules(pipe)
    before = placement(modules)
    params = {n: [id(p) for p in m.parameters()] for n, m in modules.items()}
    values = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
    onloaded = []
    real = accelerate.hooks.CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        onloaded.append(next(n for n, m in modules.items() if m is module))
        return real(self, module, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward", spy)
    args = RenderArgs(prompt="mystyle a square", frames=9, height=32, width=32, fps=8.0, steps=2, guidance=1.0)
    with idle_offloaded(family, pipe, torch.device("cpu")) as hooked:
        assert set(hooked) == set(modules)
        assert all(_hooks(m) for m in modules.values())
        with torch.no_grad():
            render(family, pipe, args)
    runs = [n for i, n in enumerate(onloaded) if i == 0 or onloaded[i - 1] != n]
    expected = ["transformer", "vae"] if text_encoder == "cpu" else ["text_encoder", "transformer", "vae"]
    assert runs == expected
    for name, m in modules.items():
        assert not _hooks(m), name
        assert placement({name: m})[name] == before[name]
        assert [id(p) for p in m.parameters()] == params[name]
        assert all(torch.equal(v, values[name][k]) for k, v in m.state_dict().items()), name


def test_an_error_inside_a_render_still_restores(clips, tmp_path):
    recipe = tiny_recipe("wan", clips, tmp_path / "run")
    family = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
    pipe = family.pipeline()
    with pytest.raises(RuntimeError, match="boom"):
        with idle_offloaded(family, pipe, torch.device("cpu")):
            raise RuntimeError("boom")
    assert not any(_hooks(m) for m in pipeline_modules(pipe).values())


# Pipelines of other shapes: a two-expert model (wan22), a component outside the pipeline's run
# order plus an image encoder (hunyuanvideo15 i2v: byT5 and SigLIP), a text connector and audio
# parts the family keeps outside Components (ltx2). All with a host-run text encoder.
@pytest.mark.parametrize("case", ["wan22:t2v", "hunyuanvideo15:i2v", "ltx2:t2v"])
def test_renders_of_every_pipeline_shape_run_offloaded_and_restore(case, clips, tmp_path):
    from PIL import Image

    recipe = tiny_recipe(case, clips, tmp_path / "run", "memory.text_encoder=cpu")
    family = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
    pipe = family.pipeline()
    d = recipe.data
    image = {"image": Image.new("RGB", (d.width, d.height), (90, 40, 20))} if family.task_input(family.task) else {}
    args = RenderArgs(prompt="mystyle a square", frames=d.frames, height=d.height, width=d.width, fps=recipe.fps,
                      steps=2, guidance=recipe.validation.guidance, **image)
    with idle_offloaded(family, pipe, torch.device("cpu")) as hooked, torch.no_grad():
        frames = render(family, pipe, args)
    assert set(hooked) == set(pipeline_modules(pipe))
    assert frames.shape[0] == d.frames and torch.isfinite(frames).all()
    assert not any(_hooks(m) for m in pipeline_modules(pipe).values())


def test_the_planner_counts_one_model_at_a_time_while_rendering():
    """The validation phase holds the optimizer state and the largest model in use, not every
    model at once; a block-swapped transformer renders with its swapped blocks in host memory, as
    it trains; a host-run text encoder is no candidate."""
    from finetune.config import load_recipe
    from finetune.memory.architecture import build_meta, weight_bytes
    from finetune.memory.planner import GIB, checkpoint_parts, plan_recipe

    path = "recipes/wan/i2v-14b_16gb.yaml"
    recipe = load_recipe(path, ["validation.prompts=[a cat]", "memory.text_encoder=gpu"])
    plan = plan_recipe(recipe)
    caching, training, val = plan.phases
    largest = [b for label, b in val.items if label.startswith("largest model")][0]
    text_encoder = dict(caching.items)["text_encoder (bf16)"]
    weights = sum(b for label, b in training.items if "frozen weights" in label)
    assert largest >= max(text_encoder, weights) and val.peak < text_encoder + weights
    assert val.peak + plan.margin(16) < 16 * GIB
    host = plan_recipe(load_recipe(path, ["validation.prompts=[a cat]", "memory.text_encoder=cpu"])).phases[2]
    (label, largest), = [(label, b) for label, b in host.items if label.startswith("largest model")]
    full = weight_bytes(build_meta(checkpoint_parts(recipe)[2]["transformer"]), torch.bfloat16, "fp8")
    assert "transformer + LoRA + denoising" in label and largest < full  # the swapped blocks stay in host memory
    assert not any("text_encoder" in label for label, _ in host.items)
