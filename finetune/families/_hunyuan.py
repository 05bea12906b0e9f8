"""LoRA key-map entries the HunyuanVideo families (``hunyuanvideo``, ``hunyuanvideo15``) share:
their original checkpoints name the double blocks' modulation and MLPs, the text token refiner
(fused ``self_attn_qkv``) and its embedders the same way, and diffusers maps both to the same
module names. Each family's ``KEY_MAP`` adds its own attention, single-block and embedder names."""

from __future__ import annotations

from finetune.lora_formats import fused

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
