"""trainer/sampling.py against Flux2Pipeline.__call__ on the tiny model (fp32, CPU).

Whole-pipeline comparisons use atol 1e-5, rtol 0: several transformer calls and a VAE decode chained
(the results are in fact bit-identical here). Noise is compared exactly.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, sampling

PIPE_TOL = dict(atol=1e-5, rtol=0.0)
STEPS = 3
GUIDANCE = 4.0
HEIGHT, WIDTH = 32, 48  # 2 x 3 tokens: not square, so a transposed layout would show


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def embeds(pipe):
    return flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a red cube on a blue floor", "a dog"])


def test_initial_noise_matches_pipeline_prepare_latents(pipe):
    noise = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=7)
    assert noise.shape == (2, 128, HEIGHT // 16, WIDTH // 16) and noise.dtype == torch.float32
    packed, ids = pipe.prepare_latents(
        batch_size=2,
        num_latents_channels=32,
        height=HEIGHT,
        width=WIDTH,
        dtype=torch.float32,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(flux2.pack_latents(noise), packed)
    assert torch.equal(flux2.image_position_ids(2, HEIGHT // 16, WIDTH // 16), ids)
    # The dtype cast happens after drawing in float32, so other dtypes get the same numbers rounded.
    half = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=7, dtype=torch.bfloat16)
    assert torch.equal(half, noise.to(torch.bfloat16))
    other = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=8)
    assert not torch.equal(other, noise)


def test_denoise_matches_pipeline_latents(pipe, embeds):
    noise = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=1)
    ours = sampling.denoise(pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=STEPS, guidance=GUIDANCE)
    expected = pipe(
        prompt_embeds=embeds, latents=noise, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
    ).images
    assert ours.shape == noise.shape and ours.dtype == torch.float32
    assert_close(flux2.pack_latents(ours), expected, **PIPE_TOL)
    assert (ours - noise).abs().max() > 0.1  # the model did move the latents


def test_generate_images_matches_pipeline(pipe, embeds):
    calls = []
    ours = sampling.generate_images(
        pipe.transformer, pipe.vae, prompt_embeds=embeds, width=WIDTH, height=HEIGHT,
        num_steps=STEPS, guidance=GUIDANCE, seed=3, callback=lambda i, total: calls.append((i, total)),
    )
    noise = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=3)
    expected = pipe(
        prompt_embeds=embeds, latents=noise, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pt",
    ).images
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert 0 <= ours.min() and ours.max() <= 1
    assert_close(ours, expected.permute(0, 2, 3, 1), **PIPE_TOL)
    assert calls == [(0, STEPS), (1, STEPS), (2, STEPS)]


def test_denoise_with_reference_images_matches_pipeline(pipe, embeds):
    rng = np.random.default_rng(0)
    # Two references of different sizes (the pipeline needs >= 64 px per side): 4x5 and 4x4 tokens.
    refs = [
        PIL.Image.fromarray(rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)),
        PIL.Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)),
    ]
    # The pipeline's own preprocessing for condition images of a size that needs no resize.
    tensors = [pipe.image_processor.preprocess(im, height=im.height, width=im.width, resize_mode="crop") for im in refs]
    ref_latents = [flux2.encode_images(pipe.vae, t) for t in tensors]
    assert [tuple(r.shape) for r in ref_latents] == [(1, 128, 4, 5), (1, 128, 4, 4)]

    noise = sampling.initial_noise(batch_size=2, height_px=HEIGHT, width_px=WIDTH, seed=2)
    ours = sampling.denoise(
        pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=STEPS, guidance=GUIDANCE,
        reference_latents=ref_latents,
    )
    expected = pipe(
        image=refs, prompt_embeds=embeds, latents=noise, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
    ).images
    assert_close(flux2.pack_latents(ours), expected, **PIPE_TOL)
    # The references matter: without them the result differs.
    plain = sampling.denoise(pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=STEPS, guidance=GUIDANCE)
    assert (plain - ours).abs().max() > 1e-3


def test_callback_can_cancel(pipe, embeds):
    seen = []

    def cancel_at_second_step(i: int, total: int) -> None:
        seen.append(i)
        if i == 1:
            raise InterruptedError("cancelled")

    noise = sampling.initial_noise(batch_size=2, height_px=16, width_px=16, seed=0)
    with pytest.raises(InterruptedError):
        sampling.denoise(
            pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=5, guidance=1.0,
            callback=cancel_at_second_step,
        )
    assert seen == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(width=40), "width 40"),
        (dict(width=0), "width 0"),
        (dict(height=8), "height 8"),
        (dict(num_steps=0), "num_steps 0"),
    ],
)
def test_generate_images_validates_inputs(pipe, embeds, kwargs, match):
    args = dict(width=WIDTH, height=HEIGHT, num_steps=1, guidance=1.0, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        sampling.generate_images(pipe.transformer, pipe.vae, prompt_embeds=embeds, **args)


def test_denoise_validates_shapes(pipe, embeds):
    noise = sampling.initial_noise(batch_size=2, height_px=16, width_px=16, seed=0)
    with pytest.raises(ValueError, match="batch"):
        sampling.denoise(pipe.transformer, prompt_embeds=embeds[:1], latents=noise, num_steps=1, guidance=1.0)
    with pytest.raises(ValueError, match=r"reference_latents\[0\]"):
        sampling.denoise(
            pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=1, guidance=1.0,
            reference_latents=[torch.zeros(1, 32, 2, 2)],
        )
