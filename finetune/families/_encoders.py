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
