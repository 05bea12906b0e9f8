"""LTX-2 specifics: training calls the transformer as LTX2Pipeline / LTX2ImageToVideoPipeline do
(connector embeddings for both streams, rope coordinates at the clip rate, per-token timesteps with
the clean first frame for i2v), the video-only audio stream carries nothing (noise at timestep
1000), noise levels follow ltx-trainer's shifted logit-normal sampler, and LTX-Video checkpoints
are turned away by name. Audio-video runs (data.audio): the cached audio latents have the
pipeline's shape, audio is noised and scored as ltx-trainer does, the adapter changes the sound,
and a video-only run ignores a clip's sound."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from finetune.families import ModelSpec, get_family
from test_families import FRAMES, PROMPT, cond_image, first_transformer_call, load, random_videos

Pipeline = diffusers.LTX2Pipeline


def unpack(kwargs: dict) -> torch.Tensor:
    """The pipeline's packed hidden states [1, f*h*w, C] -> latents [1, C, f, h, w]."""
    return Pipeline._unpack_latents(kwargs["hidden_states"], kwargs["num_frames"], kwargs["height"], kwargs["width"])


@pytest.mark.parametrize("fps", [24.0, 8.0])
@torch.no_grad()
def test_ltx2_predict_matches_the_pipeline_call(fps):
    fam = load("ltx2")
    kwargs, out = first_transformer_call(fam, frame_rate=fps, audio_guidance_scale=1.0)
    text = fam.encode_prompts([PROMPT])
    torch.testing.assert_close(text["prompt_embeds"], kwargs["encoder_hidden_states"], atol=0, rtol=0)
    torch.testing.assert_close(text["audio_prompt_embeds"], kwargs["audio_encoder_hidden_states"], atol=0, rtol=0)
    assert torch.equal(text["prompt_attention_mask"], kwargs["encoder_attention_mask"])
    # The pipeline's first step is sigma 1 for both streams: its audio is pure noise at timestep
    # 1000, what video-only training feeds; the test hands predict the same noise.
    assert kwargs["audio_num_frames"] == fam.audio_frames(kwargs["num_frames"], fps)
    assert torch.all(kwargs["timestep"] == 1000)
    latents = unpack(kwargs)
    cond = {**text, "audio_noise": kwargs["audio_hidden_states"]}
    pred = fam.predict(fam.components.transformer, latents, kwargs["timestep"], cond, fps=fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-6, rtol=0)


@torch.no_grad()
def test_ltx2_i2v_conditioning_matches_the_pipeline_call():
    """The cached first-frame latent is what LTX2ImageToVideoPipeline puts on frame 0 (without its
    inference-time H.264 re-compression of the image: the clip frame already went through a codec), those tokens
    get timestep 0, and predict on the same input gives the same output."""
    fam = load("ltx2:i2v")
    kwargs, out = first_transformer_call(fam, audio_guidance_scale=1.0, image_crf=0)
    image = cond_image(get_family("ltx2"))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    videos = pixels[None, :, None].repeat(1, 1, FRAMES, 1, 1)
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    seen = unpack(kwargs)
    torch.testing.assert_close(cond["first_latent"], seen[:, :, :1], atol=1e-5, rtol=0)

    per_frame = seen.shape[3] * seen.shape[4]
    t = kwargs["timestep"]
    assert t.shape == (1, seen.shape[2] * per_frame)
    assert (t[:, :per_frame] == 0).all() and (t[:, per_frame:] > 0).all()
    cond.update(fam.encode_prompts([PROMPT]), audio_noise=kwargs["audio_hidden_states"])
    pred = fam.predict(fam.components.transformer, seen, t[:, -1], cond, fps=fam.default_fps)
    torch.testing.assert_close(Pipeline._pack_latents(pred), out, atol=1e-5, rtol=0)


def test_ltx2_video_only_audio_stream_is_noise_at_timestep_1000():
    """diffusers always runs the audio stream; a video-only run gives it nothing to read: fresh
    noise of the clip's audio length, marked fully noisy, whatever the video's noise level."""
    fam = load("ltx2")
    seen = []
    hook = fam.components.transformer.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs), with_kwargs=True
    )
    latents = torch.randn(2, 8, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fam.predict(fam.components.transformer, latents, torch.tensor([200.0, 700.0]),
                    fam.encode_prompts([PROMPT, "b"]), fps=24.0)
    hook.remove()
    kw = seen[0]
    assert torch.equal(kw["audio_timestep"], torch.tensor([1000.0, 1000.0]))
    assert torch.equal(kw["audio_sigma"], torch.tensor([1000.0, 1000.0]))
    assert torch.equal(kw["sigma"], torch.tensor([200.0, 700.0]))
    # 9 frames at 24 fps, 16 kHz / hop 160 / 4 = 25 audio latents per second -> round(9.375) = 9
    assert kw["audio_hidden_states"].shape == (2, 9, 4)
    assert kw["audio_hidden_states"].std() > 0.5


def official_sampler(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """ltx-trainer's ShiftedLogitNormalTimestepSampler.sample, restated: stretched shifted
    logit-normal, reflected near 0, clipped, mixed with 10% uniform."""
    gen = torch.Generator().manual_seed(seed)
    mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (min(tokens, 4096) - 1024)
    s = torch.sigmoid(torch.randn(n, generator=gen, dtype=torch.float64) + mu)
    lo, hi = torch.sigmoid(torch.tensor(mu - 2.5758, dtype=torch.float64)), torch.sigmoid(torch.tensor(mu + 3.0902))
    raw = (s - lo) / (hi - lo)
    stretched = torch.where(raw >= 1e-3, raw, 2e-3 - raw).clamp(0, 1)
    uniform = (1 - 1e-3) * torch.rand(n, generator=gen, dtype=torch.float64) + 1e-3
    return torch.where(torch.rand(n, generator=gen, dtype=torch.float64) > 0.1, stretched, uniform)


@pytest.mark.parametrize("shape", [(1, 128, 3, 16, 22), (1, 128, 7, 16, 24), (1, 128, 16, 32, 48)])
def test_ltx2_training_sigmas_are_the_official_sampler_quantiles(shape):
    fam = load("ltx2")
    tokens = shape[2] * shape[3] * shape[4]
    mu = 0.95 + (2.05 - 0.95) / 3072 * (min(tokens, 4096) - 1024)
    assert fam.timestep_shift(shape) == pytest.approx(math.exp(mu))
    u = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98])
    ours = fam.training_sigmas(u, shape)
    assert torch.all(ours[1:] > ours[:-1])
    official = torch.quantile(official_sampler(400_000, tokens).float(), u)
    torch.testing.assert_close(ours, official, atol=5e-3, rtol=0)
    # not the plain shifted logit-normal of the base protocol (no stretch, no uniform part)
    plain = fam.shift_sigmas(torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(u)), shape)
    assert (plain - ours).abs().max() > 0.02


def test_ltx2_i2v_target_is_the_velocity_and_the_first_frame_is_clean_and_unscored():
    fam = load("ltx2:i2v")
    videos = random_videos(get_family("ltx2"))
    latents = fam.encode_videos(videos)
    cond = fam.encode_conditioning(videos, latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    n = fam.noisy_input_and_target(latents, noise, sigmas, cond)
    torch.testing.assert_close(n.target, noise - latents)  # ltx-trainer: video_targets = noise - latents
    assert torch.equal(n.noisy[:, :, :1], cond["first_latent"])
    s = sigmas.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(n.noisy[:, :, 1:], ((1 - s) * latents + s * noise)[:, :, 1:])
    assert n.loss_mask.flatten().tolist() == [0.0, 1.0]
    t = fam.video_timesteps(latents.shape, n.timesteps, clean_first=True)
    assert t.shape == (2, 2 * 4) and (t[:, :4] == 0).all()
    torch.testing.assert_close(t[:, 4:], (sigmas * 1000).view(2, 1).expand(2, 4))


def test_ltx2_names_the_ltx_video_families_for_an_ltx_video_checkpoint(tmp_path):
    load("ltxv095").pipeline().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"LTXVideoTransformer3DModel.*model\.family=ltxv095"):
        get_family("ltx2").load(ModelSpec(pretrained=str(tmp_path)))


# ---------------------------------------------------------------------------- audio-video LoRA

def tone_clip(path, seed: int, frames: int = 12, fps: float = 8, size: int = 64, sound: bool = True):
    """A synthetic clip (tests/conftest.py frames) with, if ``sound``, a stereo tone whose pitch
    depends on ``seed`` (48 kHz AAC, as data_prep writes)."""
    from conftest import synthetic_frames

    from finetune.video import write_video

    t = np.arange(round(frames / fps * 48000)) / 48000
    tone = 0.5 * np.sin(2 * np.pi * 330 * (seed + 1) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    audio = (np.stack([tone, tone]).astype(np.float32), 48000) if sound else None
    return write_video(synthetic_frames(frames, size, size, seed=seed), path, fps, audio=audio)


def without_sound(src, dst):
    """``src`` with its video packets copied unchanged and its audio left out (x264 may encode
    equal frames differently, so the silent twin is remuxed, not re-encoded)."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        v_in = inp.streams.video[0]
        v_out = out.add_stream_from_template(v_in)
        for packet in inp.demux(v_in):
            if packet.dts is not None:
                packet.stream = v_out
                out.mux(packet)
    return dst


def manifest_of(folder, names: list[str]):
    import json

    rows = [{"path": n, "caption": f"a square with a tone number {i}", "width": 64, "height": 64}
            for i, n in enumerate(names)]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "manifest.jsonl"


def test_ltx2_log_mel_matches_an_independent_spectrogram():
    """log_mel is ltx-core's AudioProcessor: checked against transformers' numpy spectrogram with the
    same settings (Hann 1024, hop 160, magnitude, Slaney mel filters, log of max(x, 1e-5))."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    fam = load("ltx2")
    config = fam.components.extra["audio_vae"].config
    wave = torch.randn(1, 2, 4000, generator=torch.Generator().manual_seed(0)) * 0.3
    got = fam.log_mel(wave, config)
    fb = mel_filter_bank(num_frequency_bins=513, num_mel_filters=config.mel_bins, min_frequency=0.0,
                         max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
    want = spectrogram(wave[0, 1].numpy(), window_function(1024, "hann"), frame_length=1024, hop_length=160,
                       power=1.0, center=True, pad_mode="reflect", mel_filters=fb, mel_floor=1e-5, log_mel="log")
    assert got.shape == (1, 2, 1 + 4000 // 160, config.mel_bins)
    torch.testing.assert_close(got[0, 1], torch.from_numpy(want.T).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frames,fps", [(9, 8.0), (17, 24.0)])
@torch.no_grad()
def test_ltx2_cached_audio_latents_have_the_pipelines_shape(frames, fps, tmp_path):
    """The audio latents of a clip are what the pipeline's denoising loop holds for a clip of that
    length: [audio_num_frames, channels], normalised (about unit scale), and depend on the sound."""
    fam = load("ltx2")
    seen = []
    hook = fam.components.transformer.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt=PROMPT, num_frames=frames, height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
         audio_guidance_scale=1.0, output_type="latent", **fam.pipeline_call_kwargs(fps))
    hook.remove()
    kwargs = seen[0]
    rate, channels = fam.audio_format()
    latents = torch.zeros(1, 8, (frames - 1) // 8 + 1, 2, 2)
    from finetune.video import read_audio

    waves = [read_audio(tone_clip(tmp_path / f"{i}.mp4", i, frames, fps), rate, channels, duration=frames / fps)
             for i in range(2)]
    out = [fam.encode_audio(torch.from_numpy(w)[None], latents, fps)["audio_latents"] for w in waves]
    assert out[0].shape == kwargs["audio_hidden_states"].shape == (1, kwargs["audio_num_frames"], 4)
    assert 0.1 < out[0].std() < 10 and (out[0] - out[1]).abs().mean() > 0.1


def test_ltx2_audio_stream_is_noised_with_the_video_sigma_and_scored():
    """Audio-video training: the audio goes in noised at the video's sigma, with timesteps 1000 sigma,
    and the loss is the video MSE plus the audio MSE (ltx-trainer's compute_loss)."""
    from finetune.trainer import denoising_loss, masked_mse

    fam = load("ltx2")
    gen = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 8, 2, 2, 2, generator=gen), **fam.encode_prompts([PROMPT] * 2),
             "audio_latents": torch.randn(2, 8, 4, generator=gen)}
    noise, sigmas = torch.randn(2, 8, 2, 2, 2, generator=gen), torch.tensor([0.3, 0.8])
    cond = {k: v for k, v in batch.items() if k != "latents"}
    noised = fam.noisy_input_and_target(batch["latents"], noise, sigmas, cond)
    audio = noised.streams["audio"]
    audio_noise = audio.target + batch["audio_latents"]  # target = noise - x0
    torch.testing.assert_close(audio.noisy, (1 - sigmas.view(-1, 1, 1)) * batch["audio_latents"]
                               + sigmas.view(-1, 1, 1) * audio_noise)
    assert torch.equal(audio.timesteps, sigmas * 1000)
    again = fam.noisy_input_and_target(batch["latents"], noise, sigmas, cond).streams["audio"]
    assert torch.equal(again.noisy, audio.noisy)  # reproducible from the video noise

    seen = []
    transformer = fam.components.transformer
    hook = transformer.register_forward_hook(lambda m, a, kw, out: seen.append((kw, out)), with_kwargs=True)
    with torch.no_grad():
        loss = denoising_loss(fam, transformer, batch, sigmas, noise, fps=8.0)
    hook.remove()
    kw, (video_out, audio_out) = seen[0]
    assert torch.equal(kw["audio_hidden_states"], audio.noisy) and torch.equal(kw["audio_timestep"], sigmas * 1000)
    video_pred = Pipeline._unpack_latents(video_out, 2, 2, 2)
    want = masked_mse(video_pred, noised.target, None) + masked_mse(audio_out, audio.target, None)
    torch.testing.assert_close(loss, want)


def audio_run(tmp_path, manifest, *overrides):
    """Train the tiny LTX-2: recipes/tiny/ltx2-audio.yaml when an override says data.audio=true,
    else recipes/tiny/ltx2.yaml."""
    from conftest import ROOT

    from finetune import trainer
    from finetune.config import load_recipe

    name = "ltx2-audio" if "data.audio=true" in overrides else "ltx2"
    recipe = load_recipe(ROOT / "recipes" / "tiny" / f"{name}.yaml", [f"data.manifest={manifest}",
                         f"output.dir={tmp_path / 'run'}", "checkpoint.every=0", *overrides])
    return recipe, trainer.train(recipe)


def sound_change(result, args) -> float:
    """Mean change of the rendered waveform with the run's adapter on vs off, relative to its size."""
    from finetune.inference import render_with_audio

    fam = get_family("ltx2").load(ModelSpec(pretrained="x", tiny=True))  # encoders again, for rendering
    fam.components.transformer = result.family.components.transformer
    pipe = fam.pipeline()
    pipe.set_progress_bar_config(disable=True)
    _, (with_lora, rate) = render_with_audio(fam, pipe, args)
    fam.components.transformer.disable_adapters()
    _, (base, _) = render_with_audio(fam, pipe, args)
    fam.components.transformer.enable_adapters()
    assert with_lora.shape[0] == 2 and rate == fam.components.extra["vocoder"].config.output_sampling_rate
    return float(np.abs(with_lora - base).mean() / np.abs(base).mean())


def test_an_audio_run_adapter_changes_the_generated_audio(tmp_path):
    """data.audio: the adapter covers the audio stream and cross-modal attentions, and rendering with
    it changes the sound (waveforms with the adapter on and off) several times more than a video-only adapter
    trained the same way does (that one reaches the sound only through the video tokens the
    cross-modal attention reads); infer's mp4 carries the sound, as long as the video."""
    import av
    from safetensors.torch import load_file

    from finetune.families.ltx2 import _AUDIO_BLOCK_TARGETS
    from finetune.inference import RenderArgs, render_to_file

    folder = tmp_path / "clips"
    folder.mkdir()
    manifest = manifest_of(folder, [tone_clip(folder / f"c{i}.mp4", i).name for i in range(2)])
    args = RenderArgs(prompt="mystyle, a square with a tone number 0", frames=9, height=64, width=64, fps=8.0,
                      steps=2, guidance=1.0, seed=0)
    changes = {}
    for audio in (True, False):
        recipe, result = audio_run(tmp_path / f"audio-{audio}", manifest, f"data.audio={str(audio).lower()}",
                                   "optim.steps=20", "optim.lr=3e-3")
        keys = load_file(str(result.adapter))
        for part in ("audio_attn1", "audio_ff", "audio_to_video_attn", "video_to_audio_attn"):
            assert any(f".{part}." in k for k in keys) == audio, part
        assert (set(recipe.lora_targets) >= set(_AUDIO_BLOCK_TARGETS)) == audio
        changes[audio] = sound_change(result, args)
    assert changes[True] > 1e-3 and changes[True] > 3 * changes[False], changes

    fam = get_family("ltx2").load(ModelSpec(pretrained="x", tiny=True))
    out = render_to_file(fam, fam.pipeline(), args, tmp_path / "out.mp4")
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert abs(float(a.duration * a.time_base) - float(v.duration * v.time_base)) <= 1024 / a.rate


def test_an_audio_run_learns_the_sound_of_its_clip(tmp_path):
    """The learning check for the audio stream: after training on one clip with sound, the audio
    loss at fixed noise and noise levels is well below the base model's (margin 57% when tuned)."""
    from finetune.cache import collate
    from finetune.trainer import masked_mse

    folder = tmp_path / "clips"
    folder.mkdir()
    manifest = manifest_of(folder, [tone_clip(folder / "c0.mp4", 0).name])
    _, result = audio_run(tmp_path, manifest, "data.audio=true", "optim.steps=100", "optim.lr=3e-3",
                          "lora.rank=16", "lora.alpha=16")
    fam, transformer = result.family, result.family.components.transformer
    transformer.eval()
    batch = collate([result.dataset[0]])
    cond = {k: v for k, v in batch.items() if k != "latents"}

    @torch.no_grad()
    def audio_loss() -> float:
        gen, losses = torch.Generator().manual_seed(0), []
        for sigma in (0.2, 0.4, 0.6, 0.8):
            noise = torch.randn(batch["latents"].shape, generator=gen)
            noised = fam.noisy_input_and_target(batch["latents"], noise, torch.tensor([sigma]), cond)
            _, pred = fam.predict(transformer, noised.noisy, noised.timesteps, cond, 8.0, streams=noised.streams)
            losses.append(masked_mse(pred["audio"], noised.streams["audio"].target, None).item())
        return sum(losses) / len(losses)

    with_lora = audio_loss()
    transformer.disable_adapters()
    base = audio_loss()
    transformer.enable_adapters()
    assert with_lora <= 0.7 * base, (with_lora, base)


def test_a_video_only_run_ignores_audio(tmp_path):
    """Without data.audio a clip's sound changes nothing: the adapter trained on a clip with sound
    equals the one trained on the same video packets without it, and no audio latents are cached."""
    from safetensors.torch import load_file

    adapters = []
    for sound in (True, False):
        folder = tmp_path / f"sound-{sound}"
        folder.mkdir()
        clip = tone_clip(tmp_path / "src.mp4", 0)
        if not sound:
            clip = without_sound(clip, folder / "c0.mp4")
        else:
            clip = clip.rename(folder / "c0.mp4")
        _, result = audio_run(folder, manifest_of(folder, ["c0.mp4"]), "optim.steps=3")
        assert "audio_latents" not in result.dataset[0]
        adapters.append(load_file(str(result.adapter)))
    assert adapters[0].keys() == adapters[1].keys()
    assert not any("audio" in k for k in adapters[0])
    for k in adapters[0]:
        assert torch.equal(adapters[0][k], adapters[1][k]), k


def test_an_audio_run_skips_clips_without_sound_by_name(tmp_path):
    """As ltx-trainer trains audio-video only on clips with audio latents: a silent clip is left out
    and named (skipped_clips.jsonl); data.strict makes it an error."""
    from finetune.errors import DataError

    folder = tmp_path / "clips"
    folder.mkdir()
    manifest = manifest_of(folder, [tone_clip(folder / "loud.mp4", 0).name,
                                    tone_clip(folder / "quiet.mp4", 1, sound=False).name])
    _, result = audio_run(tmp_path, manifest, "data.audio=true", "optim.steps=1")
    assert len(result.dataset) == 1
    # the cached entry holds the pipeline's audio latent length for 9 frames at 8 fps
    assert result.dataset[0]["audio_latents"].shape == (result.family.audio_frames(2, 8.0), 4)
    skipped = (tmp_path / "run" / "skipped_clips.jsonl").read_text()
    assert "quiet.mp4" in skipped and "no audio track" in skipped and "loud.mp4" not in skipped
    with pytest.raises(DataError, match="quiet.mp4.*no audio track"):
        audio_run(tmp_path / "strict", manifest, "data.audio=true", "data.strict=true", "optim.steps=1")


def test_data_audio_for_a_silent_family_is_a_named_recipe_error(tmp_path):
    from conftest import tiny_recipe

    from finetune.errors import RecipeError

    with pytest.raises(RecipeError, match=r"data.audio=true: wan generates no sound.*ltx2"):
        tiny_recipe("wan", tmp_path / "m.jsonl", tmp_path / "run", "data.audio=true")
