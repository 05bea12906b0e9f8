"""Recipes: every shipped file validates, and bad recipes fail fast with every problem named."""

import re
from pathlib import Path

import pytest
import yaml

from finetune.config import load_recipe, parse_overrides, recipe_from_dict
from finetune.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_exist_for_both_families_and_card_sizes():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    for expected in ("wan/t2v-1.3b_16gb.yaml", "wan/t2v-1.3b_24gb.yaml", "ltx/t2v-2b_16gb.yaml",
                     "ltx/t2v-2b_24gb.yaml", "tiny/wan.yaml", "tiny/ltx.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_validates_and_documents_its_launch_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# accelerate launch train_lora.py --recipe ")
    assert f"recipes/{path.relative_to(ROOT / 'recipes')}" in first
    fam = recipe.family_cls()
    assert fam.frame_rule.is_valid(recipe.data.frames)
    assert recipe.data.height % fam.spatial_factor == 0 and recipe.data.width % fam.spatial_factor == 0


def _base(**data):
    return {"model": {"family": "wan", "tiny": True}, "data": {"frames": 9, "height": 32, "width": 32, **data}}


def test_unknown_key_names_the_closest_valid_one():
    d = _base()
    d["optim"] = {"lr_rate": 1e-4}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(d, "r.yaml")
    msg = str(e.value)
    assert "optim.lr_rate: unknown key (did you mean 'lr'?)" in msg
    assert msg.startswith("r.yaml: 1 problem")


def test_unknown_section_is_rejected():
    d = _base()
    d["optimiser"] = {"lr": 1e-4}
    with pytest.raises(RecipeError, match=r"optimiser: unknown key \(did you mean 'optim'\?\)"):
        recipe_from_dict(d)


@pytest.mark.parametrize("family,frames,hint", [("wan", 80, "4k+1 for wan (try 81)"), ("ltx", 96, "8k+1 for ltx (try 97)")])
def test_frame_rule_of_the_family(family, frames, hint):
    d = {"model": {"family": family}, "data": {"frames": frames, "height": 64, "width": 64}}
    with pytest.raises(RecipeError, match=re.escape(f"data.frames={frames} must be {hint}")):
        recipe_from_dict(d)


def test_every_problem_is_reported_at_once():
    d = _base(frames=80, height=100)
    d["optim"] = {"lr": -1, "stepz": 10}
    d["lora"] = {"rank": "big"}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(d, "r.yaml")
    problems = e.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for needle in ("data.frames=80", "data.height=100 must be a multiple of 16 for wan (try 96)",
                   "optim.lr=-1", "optim.stepz: unknown key (did you mean 'steps'?)", "lora.rank='big'"):
        assert needle in text
    assert str(e.value).startswith("r.yaml: 5 problems")


def test_unknown_family_suggests_one():
    with pytest.raises(RecipeError, match=r"model.family='wna'.*did you mean 'wan'"):
        recipe_from_dict({"model": {"family": "wna"}, "data": {"frames": 9, "height": 32, "width": 32}})


def test_missing_required_field_says_what_it_is():
    with pytest.raises(RecipeError, match=r"data.frames: missing; add it \(Frames per training clip"):
        recipe_from_dict({"model": {"family": "wan"}, "data": {"height": 32, "width": 32}})


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_base()))
    r = load_recipe(path, ["optim.lr=5e-5", "data.frames=13", "lora.targets=[to_q,to_k]", "output.dir=runs/x"])
    assert r.optim.lr == 5e-5 and r.data.frames == 13 and r.lora.targets == ["to_q", "to_k"]
    assert r.output.dir == "runs/x"
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_from_dict(_base())
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert r.lora_targets == list(r.family_cls().default_lora_targets)
    assert r.fps == r.family_cls().default_fps


def test_validation_steps_below_the_family_minimum():
    d = {"model": {"family": "ltx"}, "data": {"frames": 9, "height": 64, "width": 64}, "validation": {"steps": 1}}
    with pytest.raises(RecipeError, match="validation.steps=1: ltx needs at least 2"):
        recipe_from_dict(d)


def test_buckets_need_batch_size_one():
    d = _base(buckets=True)
    d["optim"] = {"batch_size": 2}
    with pytest.raises(RecipeError, match=r"data.buckets=true .* optim.batch_size=2 must be 1"):
        recipe_from_dict(d)


def test_every_family_and_task_has_tiny_and_card_recipes():
    """A family added to the registry ships a tiny recipe per task (tests, demo) and 16 GB and
    24 GB recipes per task."""
    from finetune.families import family_names, get_family

    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    missing = []
    for family in family_names():
        cls = get_family(family)
        for task in cls.tasks:
            tiny = f"tiny/{family}.yaml" if task == cls.tasks[0] else f"tiny/{family}-{task}.yaml"
            if tiny not in names:
                missing.append(tiny)
            for card in ("16gb", "24gb"):
                if not any(n.startswith(f"{family}/{task}-") and n.endswith(f"_{card}.yaml") for n in names):
                    missing.append(f"{family}/{task}-*_{card}.yaml")
    assert missing == []


@pytest.mark.parametrize("bad,message", [
    ({"task": "v2v"}, "model.task='v2v': wan trains t2v, i2v"),
    ({"experts": ["high"]}, "model.experts=['high']: wan has one transformer"),
])
def test_task_and_experts_are_checked_against_the_family(bad, message):
    d = _base()
    d["model"].update(bad)
    with pytest.raises(RecipeError, match=re.escape(message)):
        recipe_from_dict(d)


def test_expert_names_are_the_familys():
    d = {"model": {"family": "wan22", "experts": ["high", "mid"]}, "data": {"frames": 9, "height": 32, "width": 32}}
    with pytest.raises(RecipeError, match=re.escape("model.experts=['high', 'mid']: list each of high, low")):
        recipe_from_dict(d)


def test_every_family_states_a_native_clip_length_its_frame_rule_takes():
    """The length the shipped recipes are planned at (bench/plan_recipes.py --replan)."""
    from finetune.families import family_names, get_family

    for name in family_names():
        cls = get_family(name)
        assert cls.native_frames and cls.frame_rule.is_valid(cls.native_frames), name
