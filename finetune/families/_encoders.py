"""Full-size configs of the text and image encoders the families share, as their checkpoints'
``config.json`` values (transformers classes), for the memory planner (``Family.full_size_configs``).

Sources: umT5-XXL as quoted from Wan2.1-T2V-1.3B-Diffusers/text_encoder/config.json in public
code (code search, this session). The others are the well-known configs of the public
checkpoints (google/t5-v1_1-xxl encoder, openai/clip-vit-large-patch14 text tower, Llama-3-8B as in
the llava-llama-3-8b text encoder of HunyuanVideo, Qwen2.5-VL-7B's text model, google/byt5-small as
HunyuanVideo-1.5's glyph encoder, google/siglip-so400m-patch14-384, open-clip ViT-H/14): written
from those model cards' configs, not re-read from the hub in this session.
"""

from __future__ import annotations

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_L_336_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
CLIP_VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")
LLAMA3_8B = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5)
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6)
BYT5_SMALL = dict(vocab_size=384, d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False, tie_word_embeddings=False)
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
# Qwen2.5-VL-7B-Instruct's vision tower (vision_config of its config.json), for families that load
# the whole Qwen2_5_VLForConditionalGeneration (Kandinsky 5): written from the model card's
# config, not re-read from the hub this session.
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
# Gemma-3 12B (google/gemma-3-12b-it, LTX-2's text_encoder): text_config as quoted from its
# config.json in public code (code search, this session: hidden 3840, intermediate 15360, 48 layers,
# 16 heads, 8 kv heads, head_dim 256, query_pre_attn_scalar 256); vocab_size, sliding_window,
# rope_scaling and the SigLIP-so400m/896 vision tower from the model card's config, not re-read.
GEMMA3_12B_TEXT = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
                       sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
                       max_position_embeddings=131072, rms_norm_eps=1e-6)
GEMMA3_SIGLIP_896 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=896, patch_size=14, vision_use_head=False)
