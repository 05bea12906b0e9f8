"""Train the tiny pretrained Wan that ``make demo`` loads: ``python -m finetune.tiny_base``.

A random tiny model renders noise, so a LoRA on it cannot show a style. This script trains a
small Wan 2.1-shaped model (the real diffusers classes: ``AutoencoderKLWan``,
``WanTransformer3DModel``, ``UMT5EncoderModel``, the character tokenizer of the tiny builds and
the Wan UniPC scheduler) on the sample footage in ``tests/assets`` on a CPU, in two stages:

1. the VAE (8x spatial, 4x temporal, 16 latent channels, wider than the tiny random one so that
   32x32 frames come back recognisably), as an image autoencoder: L1 reconstruction of the
   posterior mean + a small KL term on single frames of the footage, randomly colour-graded
   (:func:`colour_jitter`) so that it can also encode the demo's black-and-white clips. Its temporal layers are set by hand instead of trained
   (the causal convolutions see only the current frame, the temporal downsampler keeps the last
   frame of each pair and the upsampler repeats frames), because backpropagating through the
   VAE's frame-by-frame video path costs about ten times more per sample, too much for a CPU
   budget of minutes. So latent frame k holds source frame 4k and decodes to 4 copies of it:
   motion is choppy, colour and layout come through. Then the per-channel latent statistics
   are measured on the footage;
2. the transformer: flow matching on the VAE latents of those windows, each captioned with its
   source file's name as data_prep's template captioner would ("bigbuckbunny"), sometimes with a
   random leading word so an unseen one (a trigger word) does not throw it off. The text encoder
   stays as built (a seeded random 1-layer umT5): its outputs still tell the captions apart.

The result is written with ``WanPipeline.save_pretrained`` (fp32 safetensors), so it loads
through the same ``from_pretrained`` path as a real checkpoint, plus a README saying how it
was made. Every draw is seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import av
import diffusers
import numpy as np
import torch
import transformers

from finetune.families._tiny import channel_stats, tiny_t5_encoder_config, tiny_t5_tokenizer
from finetune.families._wan import SCHEDULER_CONFIG
from finetune.families.base import ModelSpec
from finetune.video import resize_cover

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
DEFAULT_OUT = ROOT / "assets" / "tiny-wan-base"
FOOTAGE = ("bigbuckbunny.mp4", "oa4_launch.webm", "synth_lavfi.mp4")
SIZE, FRAMES, FPS = 32, 9, 8.0
# Leading words mixed into the transformer's captions (never the demo's trigger word).
PREFIXES = ("", "", "video, ", "footage, ", "clip, ", "a shot, ", "scene, ", "film, ")


def decode_footage(path: Path, size: int) -> tuple[torch.Tensor, float]:
    """Every frame of ``path`` resized to cover ``size`` x ``size`` and centre-cropped:
    [3, F, size, size] float in [-1, 1], and the source frame rate."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate or 24)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()
    return resize_cover(video, size, size) / 127.5 - 1.0, rate


def windows(video: torch.Tensor, rate: float, frames: int, fps: float, every: int) -> list[torch.Tensor]:
    """Clips of ``frames`` frames at about ``fps`` (every ``stride``-th source frame), one
    starting at each ``every``-th source frame: a list of [3, frames, H, W]."""
    stride = max(1, round(rate / fps))
    span = (frames - 1) * stride + 1
    return [video[:, s:s + span:stride] for s in range(0, video.shape[1] - span + 1, every)]


def build_untrained(seed: int) -> dict:
    """The pipeline's parts before training, seeded: VAE 8-base (dims 8, 16, 16, 16), 2-layer
    transformer (4 heads x 32), 1-layer umT5 d 32, character tokenizer, Wan UniPC scheduler."""
    torch.manual_seed(seed)
    vae = make_framewise(diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                                    temperal_downsample=[False, True, True]))
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    tokenizer = tiny_t5_tokenizer(model_max_length=64)
    text_encoder = transformers.UMT5EncoderModel(tiny_t5_encoder_config(transformers.UMT5Config, tokenizer))
    scheduler = diffusers.UniPCMultistepScheduler(**SCHEDULER_CONFIG, flow_shift=3.0)
    return dict(vae=vae, transformer=transformer, tokenizer=tokenizer, text_encoder=text_encoder, scheduler=scheduler)


@torch.no_grad()
def make_framewise(vae: diffusers.AutoencoderKLWan) -> diffusers.AutoencoderKLWan:
    """Set the VAE's temporal weights so that it works frame by frame (module docstring): every
    causal 3D convolution sees only the current frame (its kernel's earlier time slices zeroed);
    the encoder's temporal downsamplers keep the later frame of each pair; the decoder's
    upsamplers emit each frame twice. Spatial weights are left for :func:`train_vae`."""
    for name, m in vae.named_modules():
        if not isinstance(m, torch.nn.Conv3d) or m.kernel_size[0] == 1:
            continue
        if name.endswith("time_conv"):
            m.weight.zero_()
            m.bias.zero_()
            eye = torch.eye(m.in_channels)
            for half in range(m.out_channels // m.in_channels):  # upsampler: 2 frames per input frame
                m.weight[half * m.in_channels:(half + 1) * m.in_channels, :, -1, 0, 0] = eye
        else:
            m.weight[:, :, :-1] = 0
    return vae


def decode_unclamped(vae: diffusers.AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """z [B, C, 1, h, w] -> [B, 3, 1, H, W] as ``vae.decode`` makes it but before its clamp to
    [-1, 1], which would stop the gradient of every pixel a young decoder overshoots."""
    vae.clear_cache()
    return vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=[0], first_chunk=True)


def colour_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x [B, 3, ...] in [-1, 1], three quarters of the samples re-graded at random, clamped: a
    third of those made black and white, a third put through a random channel mixer (each output channel a positive mix of the inputs, rows
    summing to 0.8-1.4, blended with the identity by a random amount: sepia and other classic
    grades are such mixers), a third pulled toward their grey and tinted. The footage alone
    has natural colours only, and a VAE that never saw a grade cannot encode one: decoded sepia
    clips came back in natural colours (warmth -0.04 against the clips' 0.19), so no LoRA could
    render them. A real video VAE has seen every kind of colour; the transformer here sees only
    the natural footage."""
    b = x.shape[0]
    rgb = ((x + 1) / 2).movedim(1, -1)  # [B, ..., 3]
    view = (b,) + (1,) * (rgb.ndim - 2)
    w = torch.rand(b, 3, 3, generator=gen)
    mixer = w / w.sum(-1, keepdim=True) * (0.8 + 0.6 * torch.rand(b, 3, 1, generator=gen))
    blend = torch.rand(b, 1, 1, generator=gen)
    mixer = blend * mixer + (1 - blend) * torch.eye(3)
    mixed = torch.einsum("b...j,bij->b...i", rgb, mixer)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True)
    grey = torch.rand(view + (1,), generator=gen)
    tint = 0.7 + 0.6 * torch.rand((b,) + (1,) * (rgb.ndim - 2) + (3,), generator=gen)
    tinted = ((1 - grey) * rgb + grey * luma) * tint
    kind = torch.randint(4, view + (1,), generator=gen)  # 0 as it is, 1 mixer, 2 grey + tint, 3 grey
    out = torch.where(kind == 1, mixed, torch.where(kind == 2, tinted, torch.where(kind == 3, luma.expand_as(rgb), rgb)))
    return (out.clamp(0, 1) * 2 - 1).movedim(-1, 1)


def train_vae(vae, clips: torch.Tensor, steps: int, seed: int, minutes: float, batch: int = 16, lr: float = 2e-3,
              kl_weight: float = 1e-6) -> tuple[float, int]:
    """clips [N, 3, 1, H, W] in [-1, 1] (single frames: the spatial weights only, the temporal
    ones stay as :func:`make_framewise` set them, the first time slice being the only one a
    single frame reaches). Adam on L1 reconstruction of the posterior mean + ``kl_weight`` * KL,
    random flips and colour grades (:func:`colour_jitter`); returns
    the last 50 steps' mean L1 and the steps done (fewer than ``steps`` if ``minutes`` ran out)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train().requires_grad_(True)
    recent, t0 = [], time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - t0 > 60 * minutes:
            break
        x = clips[torch.randint(len(clips), (batch,), generator=gen)]
        if torch.rand(1, generator=gen) < 0.5:
            x = x.flip(-1)
        x = colour_jitter(x, gen)
        post = vae.encode(x).latent_dist
        # Decoded from the posterior mean, as the trainer encodes: a sampled latent buries the
        # untrained encoder's small signal in unit noise and nothing is learned in a CPU budget.
        recon = decode_unclamped(vae, post.mode())
        l1 = (recon - x).abs().mean()
        loss = l1 + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        make_framewise(vae)  # cheap insurance that the hand-set temporal weights stay as set
        recent = (recent + [l1.item()])[-50:]
        if step % 50 == 0 or step == steps - 1:
            print(f"vae step {step + 1}/{steps}: L1 {np.mean(recent):.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    vae.eval().requires_grad_(False)
    return float(np.mean(recent)), step + 1


def train_transformer(family, latents: torch.Tensor, embeds: torch.Tensor, caption_idx: torch.Tensor, steps: int,
                      seed: int, minutes: float, batch: int = 32, lr: float = 5e-4) -> tuple[float, int]:
    """Flow matching as the LoRA trainer does it (the family's noise and target), on every
    parameter. latents [N, C, f, h, w] normalised; embeds [K, L, D] one per caption variant;
    caption_idx [N, P] the variants each clip may take. Returns the last 50 steps' mean loss and
    the steps done (fewer than ``steps`` if ``minutes`` ran out)."""
    from finetune.trainer import denoising_loss

    transformer = family.components.transformer
    transformer.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    recent, t0 = [], time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - t0 > 60 * minutes:
            break
        idx = torch.randint(len(latents), (batch,), generator=gen)
        pick = torch.randint(caption_idx.shape[1], (batch,), generator=gen)
        batch_ = {"latents": latents[idx], "prompt_embeds": embeds[caption_idx[idx, pick]]}
        u = torch.rand(batch, generator=gen)
        sigmas = family.training_sigmas(u, tuple(latents[idx].shape))
        noise = torch.randn(batch_["latents"].shape, generator=gen)
        loss = denoising_loss(family, transformer, batch_, sigmas, noise, FPS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            print(f"transformer step {step + 1}/{steps}: loss {np.mean(recent):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    transformer.eval().requires_grad_(False)
    return float(np.mean(recent)), step + 1


def footage_clips(every: int) -> tuple[torch.Tensor, list[str]]:
    """Windows of the sample footage: [N, 3, FRAMES, SIZE, SIZE] and each one's caption (the
    file name as words, as data_prep's template captioner writes it)."""
    from data_prep.caption import words_from_name

    clips, captions = [], []
    for name in FOOTAGE:
        video, rate = decode_footage(ASSETS / name, SIZE)
        ws = windows(video, rate, FRAMES, FPS, every)
        clips += ws
        captions += [words_from_name(name)] * len(ws)
        print(f"{name}: {video.shape[1]} frames at {rate:g} fps -> {len(ws)} windows", flush=True)
    return torch.stack(clips), captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--transformer-steps", type=int, default=2000)
    parser.add_argument("--vae-minutes", type=float, default=60, help="stop the VAE stage early after this long")
    parser.add_argument("--transformer-minutes", type=float, default=60, help="the same for the transformer stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    parts = build_untrained(args.seed)

    print("== 1/3 footage", flush=True)
    clips, captions = footage_clips(every=2)

    print(f"== 2/3 VAE on frames of {len(clips)} windows, {args.vae_steps} steps", flush=True)
    # Full-size frames: a VAE trained on half-size ones reconstructs 32x32 frames three times
    # worse (L1 0.34 against 0.10 on its own scale), as its filters learned one scale only.
    frames = clips[:, :, ::4].transpose(1, 2).reshape(-1, 3, 1, SIZE, SIZE)
    vae_l1, args.vae_done = train_vae(parts["vae"], frames, args.vae_steps, args.seed, args.vae_minutes)
    with torch.no_grad():
        raw = torch.cat([parts["vae"].encode(c).latent_dist.mode() for c in clips.split(32)])
    mean, std = channel_stats(raw)
    parts["vae"].register_to_config(latents_mean=mean, latents_std=std)

    print(f"== 3/3 transformer, {args.transformer_steps} steps", flush=True)
    from finetune.families.wan import WanFamily
    from finetune.families.base import Components

    c = parts
    family = WanFamily(Components(c["transformer"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler"]),
                       ModelSpec(pretrained=str(args.out)))
    latents = family._normalise(raw)
    names = sorted(set(captions))
    variants = [p + n for n in names for p in PREFIXES]
    embeds = family.encode_prompts(variants)["prompt_embeds"]
    caption_idx = torch.tensor([[names.index(cap) * len(PREFIXES) + j for j in range(len(PREFIXES))]
                                for cap in captions])
    loss, args.transformer_done = train_transformer(family, latents, embeds, caption_idx, args.transformer_steps,
                                                     args.seed, args.transformer_minutes)

    pipe = diffusers.WanPipeline(**parts)
    pipe.save_pretrained(args.out, safe_serialization=True)
    minutes = (time.perf_counter() - t0) / 60
    write_readme(args, len(clips), vae_l1, loss, minutes)
    print(f"saved {args.out} in {minutes:.1f} min (VAE L1 {vae_l1:.4f}, flow loss {loss:.4f})")
    return 0


def write_readme(args, n_clips: int, vae_l1: float, loss: float, minutes: float) -> None:
    command = (f"python -m finetune.tiny_base --out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out} "
               f"--vae-steps {args.vae_steps} --transformer-steps {args.transformer_steps} --seed {args.seed} "
               f"--vae-minutes {args.vae_minutes:g} --transformer-minutes {args.transformer_minutes:g}")
    text = f"""# Tiny pretrained Wan (demo base model)

A Wan 2.1-shaped text-to-video model small enough to train and run on a CPU, in diffusers
format (`WanPipeline.from_pretrained(this folder)`). It renders 9-frame 32x32 clips that look
like the sample footage in `tests/assets`, so a LoRA trained on it shows its style in pixels.
Not a useful model for anything else.

Made with (torch {torch.__version__}, diffusers {diffusers.__version__}, CPU, {args.threads} threads,
{minutes:.0f} minutes on a shared 2-core machine):

    {command}

Each stage would stop early if its time cap ran out (the learning-rate schedule is set for the
full step count); this run did {args.vae_done} of {args.vae_steps} VAE steps and {args.transformer_done} of {args.transformer_steps} transformer steps; a re-run
that does as many, with the same versions, reproduces these weights up to floating-point
differences between machines.

- VAE (`AutoencoderKLWan`, base_dim 8, dim_mult [1, 2, 2, 2], z_dim 16; 8x spatial, 4x temporal):
  {args.vae_done} Adam steps (of a {args.vae_steps}-step cosine schedule), batch 16, lr 2e-3 cosine, L1 (of the decoded posterior mean) + 1e-6 KL on single 32x32 frames
  (every 4th frame of {n_clips} 9-frame windows at about 8 fps), random horizontal flips and random colour grades
  (black and white, channel mixers, tints: `colour_jitter`, so it can encode a graded clip); temporal
  weights set by hand (frame by frame: `make_framewise` in `finetune/tiny_base.py`); final L1 {vae_l1:.4f} (pixels in [-1, 1]). latents_mean/std are
  the per-channel statistics of the posterior modes of those windows.
- Transformer (`WanTransformer3DModel`, 2 layers, 4 heads x 32, ffn 256, patch (1, 2, 2)):
  {args.transformer_done} AdamW steps (of a {args.transformer_steps}-step schedule), batch 32, lr 5e-4 cosine, rectified flow with Wan's shift 3
  (the LoRA trainer's loss), captions = the source file name as words, sometimes after a random
  leading word; final loss {loss:.4f}.
- Text encoder: a seeded random 1-layer umT5 (d_model 32), untrained; tokenizer: one token per
  character (`finetune/families/_tiny.py`). Scheduler: Wan's UniPC flow config, shift 3.
- Seed {args.seed} for every draw.

Training footage: `tests/assets` ({", ".join(FOOTAGE)}); sources and licences in
`tests/assets/ATTRIBUTION.md` (Big Buck Bunny: CC-BY 3.0, (c) Blender Foundation,
peach.blender.org; oa4_launch.webm: Debian renpy-demo, Expat; synth_lavfi.mp4: generated with
ffmpeg). The weights are derived from that footage.
"""
    (args.out / "README.md").write_text(text)
    (args.out / "training.json").write_text(json.dumps(
        {"command": command, "seed": args.seed, "vae_steps": args.vae_steps, "vae_steps_done": args.vae_done,
         "vae_l1": vae_l1, "transformer_steps": args.transformer_steps, "transformer_steps_done": args.transformer_done, "flow_loss": loss, "minutes": round(minutes, 1)}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
