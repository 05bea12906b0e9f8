"""What the LTX-Video families (0.9.0/0.9.1 ``ltx``, 0.9.5+ ``ltxv095``) share: the transformer
class, LTXVideoTransformer3DModel, and so the original checkpoint's key names."""

from __future__ import annotations

from finetune.lora_formats import KeyMap

# diffusers module name -> name in the original LTX-Video checkpoint (ltx_video/models/transformers,
# also ComfyUI's LTXV model): the blocks keep their names; the inverse of diffusers'
# convert_ltx_transformer_checkpoint_to_diffusers renames the rest (patchify_proj, adaln_single).
LTX_KEY_MAP = KeyMap((
    *((f"transformer_blocks.{{i}}.{a}.{p}", f"transformer_blocks.{{i}}.{a}.{p}")
      for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
    ("transformer_blocks.{i}.ff.net.0.proj", "transformer_blocks.{i}.ff.net.0.proj"),
    ("transformer_blocks.{i}.ff.net.2", "transformer_blocks.{i}.ff.net.2"),
    ("proj_in", "patchify_proj"),
    ("time_embed.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_1"),
    ("time_embed.emb.timestep_embedder.linear_2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("time_embed.linear", "adaln_single.linear"),
    ("caption_projection.linear_1", "caption_projection.linear_1"),
    ("caption_projection.linear_2", "caption_projection.linear_2"),
    ("proj_out", "proj_out"),
))
