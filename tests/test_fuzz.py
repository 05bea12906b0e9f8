"""Property-based: random recipe documents, YAML texts, command-line overrides and manifest
lines given to the validators end in a valid result or a RecipeError/DataError that names the
field (or line) at fault; never in any other exception."""

from __future__ import annotations

import json
import string
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from finetune.config import Recipe, load_recipe, parse_overrides, recipe_from_dict
from finetune.data import load_manifest
from finetune.errors import DataError, RecipeError

TINY = yaml.safe_load((ROOT / "recipes" / "tiny" / "wan.yaml").read_text())
SECTIONS = {name: list(field.annotation.model_fields) for name, field in Recipe.model_fields.items()}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])

names = st.text(string.ascii_lowercase + "_.", min_size=1, max_size=8)
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
                      max_leaves=6)


@st.composite
def recipe_documents(draw) -> object:
    """Either anything at all, or the tiny recipe with a few keys (known or not) set to random values."""
    if draw(st.booleans()):
        return draw(values)
    doc = json.loads(json.dumps(TINY))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from([*SECTIONS, "extra"]))
        key = draw(st.sampled_from(SECTIONS.get(section, ["x"])) | names)
        if draw(st.integers(0, 9)) == 0:
            doc[section] = draw(values)
        else:
            if not isinstance(doc.get(section), dict):
                doc[section] = {}
            doc[section][key] = draw(values)
    return doc


def _field_names(doc: object, prefix: str = "") -> set[str]:
    out = {f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys} | set(SECTIONS)
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(f"{prefix}{k}")
            out |= _field_names(v, f"{prefix}{k}.")
    return out


def _assert_named(err: RecipeError, doc: object) -> None:
    fields = _field_names(doc) | {"top level", "overrides look like"}
    assert err.problems
    for problem in err.problems:
        assert any(f in problem for f in fields), problem


@FUZZ
@given(recipe_documents())
def test_random_recipe_documents_validate_or_name_the_field(doc):
    try:
        recipe = recipe_from_dict(doc, source="fuzz.yaml")
    except RecipeError as err:
        _assert_named(err, doc)
    else:
        assert isinstance(recipe, Recipe)


@FUZZ
@given(text=st.text(max_size=80) | recipe_documents().map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
       overrides=st.lists(st.text(string.ascii_lowercase + string.digits + "._=-[]{}:, '\"", max_size=20),
                          max_size=3))
def test_random_yaml_files_and_overrides_load_or_name_the_field(tmp_path_factory, text, overrides):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text)
    try:
        load_recipe(path, overrides)
    except RecipeError as err:
        assert err.problems and all(p.strip() for p in err.problems)


def test_overrides_that_clash_or_do_not_parse_are_named():
    for bad, named in ((["optim=1", "optim.lr=2"], "optim.lr"), (["optim.lr=[1"], "optim.lr")):
        try:
            parse_overrides(bad)
        except RecipeError as err:
            assert named in str(err)
        else:
            raise AssertionError(f"{bad} parsed")


line_values = st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.lists(st.integers(), max_size=2)
manifest_rows = st.fixed_dictionaries({}, optional={"path": line_values | st.sampled_from(["clip.mp4", "/dev/null"]),
                                                    "caption": line_values, "width": line_values,
                                                    "height": line_values})
manifest_lines = st.one_of(
    manifest_rows.map(json.dumps),
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)


@FUZZ
@given(lines=st.lists(manifest_lines, max_size=5), raw=st.binary(max_size=20))
def test_random_manifest_lines_load_or_name_the_line(tmp_path_factory, lines, raw):
    folder = tmp_path_factory.getbasetemp()
    (folder / "clip.mp4").write_bytes(b"")
    manifest = folder / "manifest.jsonl"
    manifest.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw)
    try:
        clips = load_manifest(manifest)
    except DataError as err:
        assert str(err).startswith(f"{manifest}: ")
    else:
        assert clips and all(isinstance(c.path, Path) and isinstance(c.caption, str) for c in clips)
