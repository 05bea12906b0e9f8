"""Which packages import which: the arrows between finetune's layers point one way.

Each case imports one module in a fresh interpreter (so nothing another test imported counts)
and lists the finetune modules that came with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_with(module: str) -> set[str]:
    """The ``finetune`` modules in ``sys.modules`` after importing ``module`` alone."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'finetune' or m.startswith('finetune.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module, never", [
    # the LoRA layouts are a leaf that families use for their key maps
    ("finetune.lora_formats", ("finetune.adapters", "finetune.families", "finetune.memory", "finetune.trainer")),
])
def test_lower_layers_do_not_import_upper_ones(module, never):
    loaded = imported_with(module)
    back = sorted(m for m in loaded for n in never if m == n or m.startswith(n + "."))
    assert not back, f"{module} imports {back}"
