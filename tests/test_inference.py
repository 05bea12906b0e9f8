"""infer.py's machinery on trained run folders: scaled adapters, merged equals unfused, the saved
merged pipeline reloads through from_pretrained, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_recipe
from finetune import trainer
from finetune.errors import UserError
from finetune.inference import LoraRef, RenderArgs, apply_loras, complete_args, load_base, render

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from conftest import write_clips

    tmp = tmp_path_factory.mktemp("runs")
    manifest = write_clips(tmp / "clips", n=2, frames=12, height=32, width=32)
    runs = []
    for i, lr in enumerate(("1e-2", "5e-3")):
        recipe = tiny_recipe("wan", manifest, tmp / f"run{i}", "optim.steps=6", f"optim.lr={lr}",
                             "checkpoint.every=0", "lora.rank=4", "lora.alpha=8", f"optim.seed={i}")
        runs.append(trainer.train(recipe).run_dir)
    return runs


def _args(family, info):
    return complete_args(RenderArgs(prompt="mystyle, a square", steps=2, guidance=1.0, seed=3), family, info)


def test_adapter_file_carries_its_alpha(two_runs):
    with safe_open(str(two_runs[0] / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8


def test_merged_equals_unfused_and_saved_merged_reloads(two_runs, tmp_path):
    refs = [LoraRef(two_runs[0], 0.8), LoraRef(two_runs[1], 0.5)]
    family, info = load_base(refs, None, CPU, torch.float32)
    args = _args(family, info)
    pipe = family.pipeline()
    base = render(family, pipe, args)
    apply_loras(family, refs, merge=False)
    unfused = render(family, pipe, args)
    assert (unfused - base).abs().max() > 1e-3, "the adapters did not change the output"

    family2, _ = load_base(refs, None, CPU, torch.float32)
    merged_pipe = family2.pipeline()
    apply_loras(family2, refs, merge=True)
    merged = render(family2, merged_pipe, args)
    torch.testing.assert_close(merged, unfused, atol=1e-5, rtol=0)

    merged_pipe.save_pretrained(str(tmp_path / "merged"))
    reloaded = type(merged_pipe).from_pretrained(str(tmp_path / "merged"))
    family2.components.transformer = reloaded.transformer
    torch.testing.assert_close(render(family2, reloaded, args), merged, atol=1e-6, rtol=0)


def test_scale_zero_is_the_base_model(two_runs):
    family, info = load_base([LoraRef(two_runs[0], 0.0)], None, CPU, torch.float32)
    args = _args(family, info)
    pipe = family.pipeline()
    base = render(family, pipe, args)
    apply_loras(family, [LoraRef(two_runs[0], 0.0)], merge=False)
    torch.testing.assert_close(render(family, pipe, args), base, atol=1e-6, rtol=0)


def test_lora_ref_parsing():
    assert LoraRef.parse("runs/x") == LoraRef(__import__("pathlib").Path("runs/x"), 1.0)
    assert LoraRef.parse("runs/x:0.8").scale == 0.8
    assert LoraRef.parse("C:/runs/x").run_dir.as_posix() == "C:/runs/x"


def test_errors_name_the_problem(two_runs, tmp_path):
    with pytest.raises(UserError, match="not a trained run folder"):
        load_base([LoraRef(tmp_path)], None, CPU, torch.float32)
    with pytest.raises(UserError, match="nothing to render"):
        load_base([], None, CPU, torch.float32)
    family, info = load_base([LoraRef(two_runs[0])], None, CPU, torch.float32)
    with pytest.raises(UserError, match=r"--frames 10 must be 4k\+1 for wan \(try 9\)"):
        complete_args(RenderArgs(prompt="x", frames=10), family, info)
    other = json.loads((two_runs[1] / "video_lora.json").read_text())
    other["tiny_seed"] = 7
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "video_lora.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="same base model"):
        load_base([LoraRef(two_runs[0]), LoraRef(odd)], None, CPU, torch.float32)
