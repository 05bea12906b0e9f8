"""What the HunyuanVideo families (13B ``hunyuanvideo``, 1.5 ``hunyuanvideo15``) share: LoRA key-map
entries (their original checkpoints name the double blocks' modulation and MLPs, the text token
refiner with its fused ``self_attn_qkv``, its embedders and the final layer the same way, and
diffusers maps both to the same module names; each family's ``KEY_MAP`` adds its own attention,
single-block and embedder names), and :class:`HunyuanVideoBase`: 4k+1 frames and 16-pixel sides,
scaled posterior-sample latents, attention over valid tokens only (the token refiner's processor
here, each family's double-stream one), the pipeline's prompt length and the compression check."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from finetune.families._attention import SelfAttentionProcessor
from finetune.families.base import Components, Family, FrameRule, ModelSpec
from finetune.lora_formats import KeyMap, fused, swapped_halves

_REFINER = "txt_in.individual_token_refiner.blocks.{i}"
_DIFFUSERS_REFINER = "context_embedder.token_refiner.refiner_blocks.{i}"

SHARED_PAIRS = (
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.linear"),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.linear"),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.fc1"),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.fc2"),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.fc1"),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.fc2"),
    fused([f"{_DIFFUSERS_REFINER}.attn.to_{p}" for p in "qkv"], f"{_REFINER}.self_attn_qkv"),
    (f"{_DIFFUSERS_REFINER}.attn.to_out.0", f"{_REFINER}.self_attn_proj"),
    (f"{_DIFFUSERS_REFINER}.ff.net.0.proj", f"{_REFINER}.mlp.fc1"),
    (f"{_DIFFUSERS_REFINER}.ff.net.2", f"{_REFINER}.mlp.fc2"),
    (f"{_DIFFUSERS_REFINER}.norm_out.linear", f"{_REFINER}.adaLN_modulation.1"),
    ("context_embedder.proj_in", "txt_in.input_embedder"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
)
# The final layer, the last entries of both maps: the original's adaLN stores shift before scale
# (diffusers swaps them).
FINAL_PAIRS = (
    swapped_halves("norm_out.linear", "final_layer.adaLN_modulation.1"),
    ("proj_out", "final_layer.linear"),
)


class HunyuanVideoBase(Family):
    """Shared HunyuanVideo machinery; subclasses set their facts, the processor of their
    double-stream blocks (:meth:`set_block_processors`) and :attr:`key_map`."""

    frame_rule = FrameRule(4)
    spatial_factor = 16  # 13B: VAE 8 x transformer patch 2; 1.5: VAE 16 x patch 1
    key_map: ClassVar[KeyMap]

    def __init__(self, components: Components, spec: ModelSpec):
        super().__init__(components, spec)
        self._check_checkpoint()
        self.attend_valid_tokens_only(components.transformer)

    @classmethod
    def attend_valid_tokens_only(cls, transformer: torch.nn.Module) -> None:
        """Every attention of ``transformer`` over its valid tokens alone, without a mask
        (finetune/families/_attention.py): the blocks as :meth:`set_block_processors` says, the
        token refiner without its [B, 1, L, L] padding mask. Same outputs as diffusers' masked
        computation; used by :meth:`predict` and :meth:`pipeline` alike."""
        cls.set_block_processors(transformer)
        for block in transformer.context_embedder.token_refiner.refiner_blocks:
            block.attn.set_processor(SelfAttentionProcessor())

    @staticmethod
    def set_block_processors(transformer: torch.nn.Module) -> None:
        """Set the valid-tokens processors of the family's dual- (and single-) stream blocks."""
        raise NotImplementedError

    # --- encoding ---
    @torch.no_grad()
    def encode_videos(self, videos: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """videos: [B, 3, F, H, W] in [-1, 1], F = 4k+1, H and W multiples of 16 -> latents
        [B, C, (F-1)/4+1, h, w]: a posterior sample (with ``generator``) times the VAE's scaling
        factor, as the community trainers and HunyuanVideo-1.5's train.py encode and the pipelines
        undo before decoding. Raises ValueError for a bad shape, RuntimeError if the VAE was released."""
        return self.scaled_latents(videos, generator)

    # --- inference ---
    def pipeline_call_kwargs(self, fps: float, image: Any = None) -> dict[str, Any]:
        """The training prompt length, and the first frame for i2v (no frame-rate input)."""
        return {"max_sequence_length": self.text_len, **super().pipeline_call_kwargs(fps, image)}

    # --- LoRA interchange ---
    @classmethod
    def comfyui_key_map(cls, transformer_name: str = "transformer") -> KeyMap:
        """The original checkpoint's names (:attr:`key_map`)."""
        return cls.key_map

    # --- checks ---
    def _check_checkpoint(self) -> None:
        """The class-level frame and size rules must match the loaded checkpoint."""
        c = self.components
        if c.vae is None:
            return
        config = c.transformer.config
        self.check_compression(c.vae.spatial_compression_ratio * config.patch_size,
                               c.vae.temporal_compression_ratio * config.patch_size_t, self.checkpoint_fix())

    def checkpoint_fix(self) -> str:
        """What to load instead, for the errors of the checkpoint checks."""
        return f"use a checkpoint such as {self.model_id_for(self.task)}"
