"""Which packages import which: the arrows between finetune's layers point one way.

  finetune.weights    what loading needs (fp8, float32 rules, text-encoder placement, VAE tiles)
  finetune.families   the model families, loading through finetune.weights
  finetune.memory     runtime offload and the planner, reading the families

Each case imports its modules in a fresh interpreter (so nothing another test imported counts)
and lists the finetune modules that came with them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("finetune.families", "finetune.memory", "finetune.trainer", "finetune.config", "finetune.cache")


def imported_with(code: str) -> set[str]:
    """The ``finetune`` modules in ``sys.modules`` after running ``code`` (imports) alone."""
    probe = (f"import json, sys; {code}; "
             "print(json.dumps(sorted(m for m in sys.modules if m == 'finetune' or m.startswith('finetune.'))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("code, never", [
    # what loading needs sits below the families and the planner
    ("import finetune.weights.fp8, finetune.weights.dtypes, finetune.weights.encoders, finetune.weights.vae", UPPER),
    # every family loads through it and never reaches up to the runtime or the planner that reads them
    ("import finetune.families as f; f.family_names()", ("finetune.memory", "finetune.trainer")),
    # the LoRA layouts are a leaf that families use for their key maps
    ("import finetune.lora_formats", ("finetune.adapters", "finetune.families", "finetune.memory", "finetune.trainer")),
], ids=["weights", "families", "lora_formats"])
def test_lower_layers_do_not_import_upper_ones(code, never):
    loaded = imported_with(code)
    back = sorted(m for m in loaded for n in never if m == n or m.startswith(n + "."))
    assert not back, f"{code}: brings in {back}"
