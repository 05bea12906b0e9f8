"""The memory planner: counts equal real allocations on the tiny models, every shipped recipe plans
offline, overrides are deterministic and fit, and bad input gives named errors."""

from __future__ import annotations

import pytest
import torch

import train_lora
from conftest import ROOT, tiny_recipe
from finetune import trainer
from finetune.config import load_recipe
from finetune.errors import RecipeError
from finetune.families import family_names, get_family
from finetune.families.base import Components, FullSize, ModelSpec
from finetune.memory import planner
from finetune.memory.architecture import build_meta, lora_param_count, weight_bytes
from finetune.memory.trace import StepSettings, trace_step

SHIPPED = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "tiny")
WAN_14B = "recipes/wan/t2v-14b_24gb.yaml"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    # plans are for a training machine, not this one: host memory is checked against 256 GiB
    # unless a test says otherwise
    monkeypatch.setattr(planner, "machine_memory_gb", lambda: 256.0)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


SOUND = [n for n in family_names() if get_family(n).supports_audio]
AV_24GB = "recipes/ltx2/t2v-19b-av_24gb.yaml"


@pytest.mark.parametrize("family", family_names() + [f"{n}+audio" for n in SOUND])
def test_predicted_bytes_equal_allocated_on_the_tiny_model(family, tmp_path):
    """Frozen weights, LoRA, gradients and AdamW state as counted on the meta-device copy of the
    tiny transformer equal what the trainer's own add_lora / optimizer allocate after one step
    (``+audio``: an audio-video recipe, whose LoRA also adapts the sound modules)."""
    family, audio, _ = family.partition("+audio")
    recipe = tiny_recipe(family, tmp_path / "manifest.jsonl", tmp_path / "run", "lora.rank=4",
                         f"data.audio={'true' if audio == '+audio' else 'false'}")
    fam = recipe.family_cls().load(trainer.model_spec(recipe, torch.device("cpu")))
    transformer = fam.components.transformer
    meta = build_meta(FullSize(type(transformer), dict(transformer.config)))
    predicted_frozen = weight_bytes(meta, torch.float32)
    predicted_lora = lora_param_count(meta, recipe.lora_targets, recipe.lora.rank)

    params = trainer.add_lora(transformer, recipe)
    optimizer = trainer.make_optimizer(params, recipe)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()

    frozen = [t for n, t in transformer.named_parameters() if "lora_" not in n] + list(transformer.buffers())
    assert _tensor_bytes(frozen) == predicted_frozen
    assert sum(p.numel() for p in params) == predicted_lora
    assert _tensor_bytes(params) == predicted_lora * planner.LORA_BYTES
    assert _tensor_bytes(p.grad for p in params) == predicted_lora * planner.LORA_BYTES
    moments = [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert _tensor_bytes(moments) == predicted_lora * planner.OPTIM_BYTES["adamw"]


@pytest.mark.parametrize("case", [f"{n}:{t}" for n in family_names() for t in get_family(n).tasks])
def test_every_family_describes_its_default_checkpoint(case):
    name, _, task = case.partition(":")
    fam = get_family(name)
    configs = fam.full_size_configs(task)
    assert fam.model_id_for(task) in configs
    for parts in configs.values():
        assert {"transformer", "vae", "text_encoder"} <= set(parts)
        for part in parts.values():
            assert sum(p.numel() for p in build_meta(part).parameters()) > 0
    latent, cond = fam.planning_inputs(task, 17, 256, 256, fam.max_sequence_length)
    assert len(latent) == 5 and latent[0] == 1 and cond


@pytest.mark.parametrize("recipe", SHIPPED)
def test_plan_prints_a_table_for_every_shipped_recipe(recipe, capsys):
    assert train_lora.main(["--plan", "--recipe", recipe]) == 0
    out = capsys.readouterr().out
    for phase in ("caching", "training", "predicted peak"):
        assert phase in out
    assert "frozen weights" in out and "optimizer state" in out


def test_attention_is_counted_as_a_fused_kernel():
    """No [heads, L, L] matrix: the whole traced live peak of a Wan 1.3B step at 32,760 tokens is
    far below one head's L x L scores, and each further block keeps its bf16 input."""
    fam = get_family("wan")
    settings = StepSettings(rank=16, alpha=16, targets=tuple(fam.default_lora_targets))
    trace = trace_step(fam, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "t2v", 81, 480, 832, 16.0, settings,
                       (("num_layers", 2),))
    tokens = 21 * 30 * 52
    assert 0 < trace.peak < 12 * tokens * tokens * 2 / 4  # a quarter of the math kernel's saved [12, L, L] scores
    # checkpointed: a block leaves its output (the next block's input) and the tensors it shares
    assert tokens * 1536 * 2 <= trace.kept["blocks"] < 1.2 * tokens * 1536 * 2


def test_checkpointing_keeps_less_than_saving_everything():
    recipe = load_recipe(WAN_14B, ["memory.activation_offload=false"])
    on = planner.plan_recipe(recipe)
    off = planner.plan_recipe(load_recipe(WAN_14B, ["memory.activation_offload=false",
                                                    "memory.gradient_checkpointing=false"]))
    assert on.peak < off.peak


def test_overrides_are_deterministic_and_fit():
    recipe = load_recipe(WAN_14B, ["optim.optimizer=adamw", "model.quantization=none"])
    first = planner.choose_overrides(recipe, 16)
    second = planner.choose_overrides(recipe, 16)
    assert first.overrides and first.overrides == second.overrides
    applied = planner.apply_overrides(recipe, first.overrides)
    assert planner.plan_recipe(applied).fits(16)
    # in the fixed order of cost: the cheaper settings come first
    keys = list(first.overrides)
    assert keys[0] == "optim.optimizer" and "model.quantization" in keys


def test_memory_auto_applies_the_overrides(capsys):
    recipe = load_recipe(WAN_14B, ["memory.auto=true", "memory.vram_gb=16", "optim.optimizer=adamw",
                                   "model.quantization=none"])
    planned = planner.run_planner(recipe, WAN_14B, apply=True)
    expected = planner.choose_overrides(recipe, 16).overrides
    for key, value in expected.items():
        section, name = key.split(".")
        assert getattr(getattr(planned, section), name) == value
    assert "overrides to add" in capsys.readouterr().out


def test_a_recipe_that_cannot_fit_is_a_named_error():
    with pytest.raises(planner.DoesNotFit, match=r"closest is .*predicted peak \d+\.\d+ GiB"):
        planner.choose_overrides(load_recipe("recipes/wan/t2v-1.3b_16gb.yaml"), 1)


@pytest.mark.parametrize("vram", ["0", "-8", "many"])
def test_bad_vram_is_a_named_error(vram):
    with pytest.raises(planner.InvalidVram, match="--vram"):
        train_lora.main(["--plan", "--recipe", WAN_14B, "--vram", vram])


def test_bad_memory_fields_are_recipe_errors():
    with pytest.raises(RecipeError, match="memory.vram_gb"):
        load_recipe(WAN_14B, ["memory.vram_gb=0"])
    with pytest.raises(RecipeError, match="did you mean 'blocks_to_swap'"):
        load_recipe(WAN_14B, ["memory.blocks_to_swp=4"])


def test_auto_without_a_card_size_is_a_named_error():
    recipe = load_recipe(WAN_14B, ["memory.auto=true"])
    with pytest.raises(planner.PlannerError, match="memory.vram_gb"):
        planner.run_planner(recipe, WAN_14B, apply=True)


def test_tiny_recipes_are_not_planned():
    with pytest.raises(planner.PlannerError, match="model.tiny"):
        train_lora.main(["--plan", "--recipe", "recipes/tiny/wan.yaml"])


def test_block_swap_of_bitsandbytes_weights_stops_before_loading():
    # block swap streams plain and fp8 (torchao) weights; int8/nf4 (bitsandbytes) it does not
    for quant in ("int8", "nf4"):
        recipe = load_recipe(WAN_14B, [f"model.quantization={quant}", "memory.blocks_to_swap=4"])
        with pytest.raises(planner.NotImplementedYet, match=f"memory.blocks_to_swap=4 with model.quantization={quant}"):
            planner.check_implemented(recipe)
    for quant in ("fp8", "none"):
        planner.check_implemented(load_recipe(WAN_14B, [f"model.quantization={quant}", "memory.blocks_to_swap=4",
                                                        "memory.activation_offload=true"]))


def test_swapped_blocks_are_the_last_ones_and_two_stay_on_the_card():
    # HunyuanVideo runs its dual-stream blocks, then its single-stream ones: the last N are single first
    hunyuan = load_recipe("recipes/hunyuanvideo/t2v-13b_24gb.yaml")
    _, _, parts = planner.checkpoint_parts(hunyuan)
    blocks = planner.blocks_of(parts["transformer"], torch.bfloat16, "none")
    (dual, n_dual), (single, n_single) = blocks.counts.items()
    assert blocks.swapped(3) == (3 * blocks.bytes_each[single], blocks.bytes_each[single])
    assert blocks.swapped(n_single + 1) == (n_single * blocks.bytes_each[single] + blocks.bytes_each[dual],
                                            max(blocks.bytes_each.values()))
    fam, ckpt, parts = planner.checkpoint_parts(load_recipe(WAN_14B))
    each = planner.blocks_of(parts["transformer"], torch.bfloat16, "none").bytes_each["blocks"]

    def frozen(n: int) -> int:
        phase, _ = planner.training_phase(load_recipe(WAN_14B, ["model.quantization=none", "data.frames=5",
                                                                   f"memory.blocks_to_swap={n}"]))
        return next(b for label, b in phase.items if "frozen weights" in label)

    assert frozen(0) - frozen(5) == 3 * each  # 5 leave, 2 come back (computing, prefetched)
    assert frozen(0) == frozen(1)  # the one swapped block is on the card while it computes


@pytest.mark.parametrize("family", SOUND)
def test_audio_targets_add_lora_parameters_on_the_tiny_model(family):
    """The audio case above counts more than the video-only one: the sound modules are LoRA targets."""
    fam = get_family(family)
    transformer = fam.build_tiny().transformer
    meta = build_meta(FullSize(type(transformer), dict(transformer.config)))
    video, both = (lora_param_count(meta, fam.default_targets(audio=a), 4) for a in (False, True))
    assert both > video > 0


def test_an_audio_video_recipe_plans_its_sound():
    """data.audio: more LoRA (the sound and cross-modal targets), more activations (the audio tokens
    traced requiring grad), the audio VAE while caching; the audio stream as long as the clip."""
    video = planner.plan_recipe(load_recipe(AV_24GB, ["data.audio=false", "data.frames=49"]))
    both = planner.plan_recipe(load_recipe(AV_24GB, ["data.audio=true", "data.frames=49"]))

    def item(plan, phase: str, start: str) -> int:
        return next(b for label, b in next(p for p in plan.phases if p.name == phase).items if label.startswith(start))

    assert item(both, "training", "LoRA parameters") > item(video, "training", "LoRA parameters")
    assert item(both, "training", "optimizer state") > item(video, "training", "optimizer state")
    assert item(both, "training", "activations") > item(video, "training", "activations")
    assert item(both, "caching", "audio_vae") > 0
    assert not any(label.startswith("audio_vae") for p in video.phases for label, _ in p.items)
    # 49 frames at 24 fps = 2.04 s of sound at 16 kHz / hop 160 / 4 = 25 latents per second
    assert both.stream_tokens == {"audio": round(49 / 24 * 25)} and video.stream_tokens == {}
    assert "2,688 video tokens + 51 audio tokens" in planner.format_plan(both)


def test_a_recipes_lora_targets_are_what_the_audio_plan_counts():
    targets = "lora.targets=[attn1.to_q,audio_attn1.to_q]"
    plan = planner.plan_recipe(load_recipe(AV_24GB, [targets]))
    _, _, parts = planner.checkpoint_parts(plan.recipe)
    lora = next(b for label, b in plan.phases[1].items if label.startswith("LoRA parameters"))
    # 48 blocks x r 32 x (in + out): 4096 -> 4096 (video), 2048 -> 2048 (audio)
    assert lora == 48 * 32 * (2 * 4096 + 2 * 2048) * planner.LORA_BYTES


@pytest.mark.parametrize("frames,fps", [(49, 24.0), (121, 30.0), (9, 8.0)])
def test_the_planned_audio_stream_is_as_long_as_the_cached_one(frames, fps):
    """planning_streams (a classmethod, from the full-size config) gives the length that
    encode_audio caches and predict runs: audio_frames of the family built on that config."""
    fam = get_family("ltx2")
    full = fam.full_size_configs("t2v")[fam.default_model_id]["transformer"]
    built = fam(Components(build_meta(full), None, None, None, None), ModelSpec(pretrained=fam.default_model_id))
    latent_frames = (frames - 1) // fam.frame_rule.temporal_factor + 1
    shape = fam.planning_streams("t2v", frames, 512, 768, fps)["audio"]
    assert shape == (1, built.audio_frames(latent_frames, fps), full.config["audio_in_channels"])
    assert shape[1] == round(frames / fps * 25)


def test_too_many_blocks_to_swap_is_named_before_any_weight_loads(monkeypatch, capsys):
    """Wan 14B has 40 blocks: 41 fails in --plan, in the pre-training planner (memory.vram_gb) and in a
    plain run, each before the trainer starts; 40 is accepted."""
    def no_training(*_, **__):
        raise AssertionError("the trainer started")

    monkeypatch.setattr(trainer, "train", no_training)
    message = r"memory.blocks_to_swap=41: the wan .* transformer has 40 blocks \(blocks: 40\); .* at most 40"
    for argv in (["--plan"], ["--plan", "--vram", "24"], ["memory.vram_gb=24", "memory.auto=true"], []):
        with pytest.raises(planner.TooManySwappedBlocks, match=message):
            train_lora.main(["--recipe", WAN_14B, *argv, "model.quantization=fp8", "memory.blocks_to_swap=41"])
    assert issubclass(planner.TooManySwappedBlocks, planner.BlockSwapError)  # what the runtime check raises
    planner.check_blocks_to_swap(load_recipe(WAN_14B, ["memory.blocks_to_swap=40"]))
    assert train_lora.main(["--plan", "--recipe", WAN_14B, "memory.blocks_to_swap=40"]) == 0


def test_block_count_counts_every_block_list():
    """HunyuanVideo's largest valid value is its dual- plus single-stream blocks."""
    recipe = "recipes/hunyuanvideo/t2v-13b_24gb.yaml"
    _, _, parts = planner.checkpoint_parts(load_recipe(recipe))
    counts = planner.blocks_of(parts["transformer"], torch.bfloat16, "none").counts
    total = sum(counts.values())
    planner.check_blocks_to_swap(load_recipe(recipe, [f"memory.blocks_to_swap={total}"]))
    with pytest.raises(planner.TooManySwappedBlocks, match=f"has {total} blocks .*at most {total}"):
        planner.check_blocks_to_swap(load_recipe(recipe, [f"memory.blocks_to_swap={total + 1}"]))


def test_tiny_and_unknown_checkpoints_are_left_to_the_check_after_loading(tmp_path):
    planner.check_blocks_to_swap(tiny_recipe("wan", tmp_path / "m.jsonl", tmp_path / "run", "memory.blocks_to_swap=9"))
    planner.check_blocks_to_swap(load_recipe(WAN_14B, ["model.pretrained=my/own-wan", "memory.blocks_to_swap=99"]))


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_a_text_encoder_already_in_8_bit_can_still_go_to_the_cpu(mode):
    """The LTX-2 audio-video recipe's fp8 Gemma alone is over 13 GiB: for 16 GiB the cheapest
    setting that fits is the text encoder on the CPU, not 'cannot fit'."""
    recipe = load_recipe(AV_24GB, [f"memory.text_encoder={mode}"])
    plan = planner.choose_overrides(recipe, 16)
    assert plan.overrides["memory.text_encoder"] == "cpu" and plan.fits(16)


def test_the_audio_video_recipe_fits_its_card_with_its_sound():
    plan = planner.plan_recipe(load_recipe(AV_24GB))
    assert plan.recipe.data.audio and plan.stream_tokens["audio"] > 0
    assert plan.fits(24)


def test_a_plan_fits_only_with_its_margin_left_free(capsys):
    recipe = "recipes/wan/t2v-1.3b_24gb.yaml"
    plan = planner.plan_recipe(load_recipe(recipe))
    card = (plan.peak + planner.GIB // 2) / planner.GIB  # half a GiB above the peak: less than 6% of it
    assert not plan.fits(card) and plan.margin(card) == int(0.06 * card * planner.GIB)
    assert planner.plan_recipe(load_recipe(recipe, ["memory.margin_gb=0.25"])).fits(card)
    assert train_lora.main(["--plan", "--recipe", recipe, "--vram", "24"]) == 0
    assert "margin: 1.44 GiB (6% of the card" in capsys.readouterr().out


def test_a_4_bit_recipe_swaps_blocks_in_fp8_never_in_nf4():
    """Block swap streams fp8 weights, not bitsandbytes ones: an nf4 recipe that needs swapped
    blocks gets model.quantization=fp8 with them, and the trainer runs what is proposed."""
    recipe = load_recipe(WAN_14B, ["data.frames=81", "model.quantization=nf4", "memory.blocks_to_swap=0",
                                   "memory.activation_offload=false"])
    plan = planner.choose_overrides(recipe, 16)
    assert plan.overrides.get("memory.blocks_to_swap", 0) > 0
    assert plan.overrides["model.quantization"] == "fp8"
    planner.check_implemented(planner.apply_overrides(recipe, plan.overrides))


@pytest.mark.parametrize("recipe,vram", [("recipes/wan/i2v-14b_16gb.yaml", 12), ("recipes/hunyuanvideo15/t2v-480p_16gb.yaml", 16),
                                         ("recipes/ltx/t2v-2b_16gb.yaml", 8), ("recipes/wan22/t2v-a14b_24gb.yaml", 24)])
def test_every_proposal_replans_as_fitting_and_runs(recipe, vram):
    """What --plan proposes, applied to the recipe: validated, runnable (check_implemented, the block
    count), and planned again it fits with the margin."""
    base = load_recipe(recipe)
    plan = planner.choose_overrides(base, vram)
    applied = planner.apply_overrides(base, plan.overrides)
    planner.check_implemented(applied)
    planner.check_blocks_to_swap(applied)
    again = planner.plan_recipe(applied, vram)
    assert again.fits(vram) and again.peak == plan.peak


def test_host_memory_beyond_the_machine_is_a_named_error():
    recipe = load_recipe(WAN_14B, ["model.quantization=fp8", "memory.blocks_to_swap=30",
                                   "memory.activation_offload=true", "memory.host_gb=8"])
    with pytest.raises(planner.HostMemoryShort, match=r"keeps \d+\.\d GiB in host memory \(largest: .*\).*"
                                                     r"memory.host_gb"):
        planner.run_planner(recipe, WAN_14B, vram=48, apply=True)


def test_plan_alone_warns_of_host_memory_it_may_be_run_elsewhere(capsys):
    recipe = load_recipe(WAN_14B, ["model.quantization=fp8", "memory.blocks_to_swap=30",
                                   "memory.activation_offload=true", "memory.host_gb=8"])
    planner.run_planner(recipe, WAN_14B, vram=48)
    assert "warning: wan Wan-AI/Wan2.1-T2V-14B-Diffusers: the run keeps" in capsys.readouterr().out


def test_the_frames_search_stops_at_the_tasks_shortest_clip():
    """Shorter clips are the planner's last lever; it never tries one the task cannot train on
    (LongCat's i2v needs a latent frame after the image: it raised ValueError from the trace)."""
    longcat, wan = get_family("longcat"), get_family("wan")
    assert (wan.min_frames("t2v"), wan.min_frames("i2v")) == (1, 5)
    assert (longcat.min_frames("continue"), longcat.min_frames("continue", 5)) == (17, 9)
    with pytest.raises(planner.DoesNotFit, match=r"the closest is .*data\.frames=5, predicted"):
        planner.choose_overrides(load_recipe("recipes/longcat/i2v-13.6b_24gb.yaml"), 12)
