"""Tiled and sliced VAE encoding and decoding (``memory.vae_tiling``).

  auto  on when the run is on a GPU; on a CPU the VAE is left as the family loads it (host
        memory is rarely what a CPU run lacks, and the tiny test models keep untiled latents)
  on    the VAE encodes and decodes tile by tile with its own tile sizes, and a batch one clip
        at a time (its ``enable_tiling()`` / ``enable_slicing()``)
  off   whole frames (``disable_tiling()``; slicing is left as loaded: it only splits a batch,
        which changes no value)

A diffusers video VAE only tiles a clip larger than its tile (256 or 512 pixels a side for the
families here), so ``on`` changes nothing for small clips; for large ones the tiles overlap and are
blended, so latents differ slightly from untiled ones, and the cache keys them separately
(:attr:`finetune.cache.CacheKey.vae_tiling`). The memory planner counts the encode working memory of
one tile when tiling is on (:func:`tile_size`).
"""

from __future__ import annotations

import torch

from finetune.errors import UserError

MODES = ("auto", "on", "off")
# the diffusers attributes that hold a VAE's spatial tile size (pixels), the same in every video VAE
TILE_ATTRS = ("tile_sample_min_height", "tile_sample_min_width")


class VaeTilingUnsupported(UserError):
    """``memory.vae_tiling=on`` for a family whose VAE cannot encode in tiles."""


def wanted(mode: str, device: torch.device | str) -> bool | None:
    """What ``memory.vae_tiling=mode`` asks for on ``device``: True (tiled), False (whole) or None
    (as the family loads it). Raises ValueError for an unknown mode."""
    if mode not in MODES:
        raise ValueError(f"memory.vae_tiling={mode!r} is not one of {', '.join(MODES)}")
    if mode == "auto":
        return True if torch.device(device).type == "cuda" else None
    return mode == "on"


def can_tile(vae: torch.nn.Module) -> bool:
    return callable(getattr(vae, "enable_tiling", None)) and callable(getattr(vae, "disable_tiling", None))


def set_tiling(vae: torch.nn.Module, on: bool, family: str, family_tiles: bool = True) -> None:
    """Tiled (and sliced) encode/decode of ``vae`` on or off. Raises VaeTilingUnsupported when asked
    for tiles from a family that says its VAE has none (``Family.vae_tiles``) or a VAE without
    ``enable_tiling``."""
    if not (family_tiles and can_tile(vae)):
        if on:
            raise VaeTilingUnsupported(f"memory.vae_tiling=on: {family}'s VAE ({type(vae).__name__}) cannot encode "
                                       f"in tiles; set memory.vae_tiling to auto or off")
        return
    if on:
        vae.enable_tiling()
        if callable(getattr(vae, "enable_slicing", None)):
            vae.enable_slicing()
    else:
        vae.disable_tiling()


def tiling_on(vae: torch.nn.Module | None) -> bool:
    """Whether ``vae`` encodes in tiles now."""
    return bool(getattr(vae, "use_tiling", False))


def tile_size(vae: torch.nn.Module) -> tuple[int, int] | None:
    """The (height, width) in pixels above which ``vae`` splits a frame into tiles, or None if it
    has no tile size."""
    h, w = (getattr(vae, a, None) for a in TILE_ATTRS)
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) else None
