"""bench/opensora2_official.py without the official checkout (the comparison itself needs one:
see README, Benchmarks): a wrong ``--official`` fails naming the path and the fix, and the
stand-in for Liger's rotary kernel rotates as our port does, from the official (cos, sin) layout."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import opensora2_official as bench  # noqa: E402  (bench/opensora2_official.py)

from finetune.families.opensora2_model import OpenSora2RotaryEmbed, position_ids, rotate  # noqa: E402


def test_a_folder_without_the_official_model_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no opensora/models/mmdit/model\.py.*git archive"):
        bench.import_official(tmp_path)


def test_rope_stand_in_matches_our_rotation_from_the_official_cos_sin_layout():
    """The official LigerEmbedND hands the kernel each half of (cos, sin) twice, [B, S, D]; the
    stand-in reads the first half and pairs dims (d, d + D/2), as our ``rotate`` does."""
    torch.manual_seed(0)
    ids = position_ids((2, 3, 2), 4, torch.device("cpu"))
    cos, sin = OpenSora2RotaryEmbed(10_000, [4, 6, 6], rotate_half=True)(ids)  # [S, 8]
    q, k = torch.randn(2, 3, len(ids), 16), torch.randn(2, 3, len(ids), 16)  # [B, H, S, D]
    official_layout = [t.repeat(1, 2)[None].expand(2, -1, -1) for t in (cos, sin)]  # [B, S, 16]
    got_q, got_k = bench.LigerRopeFunction.apply(q, k, *official_layout)
    for got, x in ((got_q, q), (got_k, k)):
        want = rotate(x.transpose(1, 2), (cos, sin), rotate_half=True).transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
