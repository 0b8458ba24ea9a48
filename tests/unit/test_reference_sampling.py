"""Reference images at sampling time (edit LoRAs, FLUX.2 multi-reference editing) against Flux2Pipeline(image=...).

flux2.prepare_reference_pixels is compared with Flux2ImageProcessor exactly (torch.equal). Whole renders (our
inference.sample_images and the FLUX.2 Sample node against the pipeline given the same PIL images, prompt
embeddings and noise, fp32 on the CPU) use atol 1e-5, rtol 0, as tests/unit/test_sampling.py does: several
transformer calls, a VAE encode per reference and a VAE decode chained (the results are in fact bit-identical here:
the pixels even share diffusers' memory layout, which picks the VAE's convolution kernels).
"""

from __future__ import annotations

import importlib

import numpy as np
import PIL.Image
import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, inference, sampling
from flux2_lora_pack.trainer.model_files import inspect_model_folder

PIPE_TOL = dict(atol=1e-5, rtol=0.0)
GUIDANCE = 4.0
HEIGHT, WIDTH = 32, 48


def _noise_image(width: int, height: int, *, seed: int, mode: str = "RGB") -> PIL.Image.Image:
    channels = {"RGB": (3,), "RGBA": (4,), "L": ()}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, *channels), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels)
    assert image.mode == mode
    return image


def _as_comfy_image(images: list[PIL.Image.Image]) -> torch.Tensor:
    """What ComfyUI's Load Image hands a node: (B, H, W, 3) float32, uint8 / 255."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB")).astype(np.float32) / 255.0) for im in images])


def _pipeline_pixels(processor, image: PIL.Image.Image) -> torch.Tensor:
    """Flux2Pipeline.__call__'s step 4 ("process images") for one condition image, with its own processor."""
    width, height = image.size
    if width * height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    width, height = width // 16 * 16, height // 16 * 16
    return processor.preprocess(image, height=height, width=width, resize_mode="crop")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def embeds(pipe):
    return flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["turn the cube red", "a dog"])


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    yield inference.Flux2ModelSpec(folder=inspect_model_folder(tiny_model_dir), precision="fp32")
    inference.release_all()


def _pipeline_images(pipe, *, refs: list[PIL.Image.Image], embeds: torch.Tensor, seed: int, steps: int) -> torch.Tensor:
    noise = sampling.initial_noise(batch_size=embeds.shape[0], height_px=HEIGHT, width_px=WIDTH, seed=seed)
    images = pipe(
        image=refs, prompt_embeds=embeds, latents=noise, height=HEIGHT, width=WIDTH,
        num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt",
    ).images
    return images.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(
    ("size", "mode", "expected_hw"),
    [
        ((64, 64), "RGB", (64, 64)),  # already a multiple of 16: untouched
        ((70, 50), "RGB", (48, 64)),  # floored and centre-cropped
        ((1100, 1000), "RGB", (976, 1072)),  # above 1024^2: Lanczos to 1073x976 first, then floored
        ((2000, 600), "RGB", (560, 1856)),  # wide and above 1024^2
        ((1024, 1024), "RGB", (1024, 1024)),  # exactly 1024^2: no resize
        ((90, 81), "RGBA", (80, 80)),  # alpha dropped after the crop, as the pipeline's convert_to_rgb does
        ((81, 90), "L", (80, 80)),  # grey becomes RGB
    ],
)
def test_prepare_reference_pixels_equals_the_pipeline_preprocessing(pipe, size, mode, expected_hw):
    image = _noise_image(*size, seed=sum(size), mode=mode)
    [ours] = flux2.prepare_reference_pixels([image])
    expected = _pipeline_pixels(pipe.image_processor, image)
    assert ours.shape == (1, 3, *expected_hw) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


def test_a_comfy_image_batch_is_seen_as_the_pil_images_diffusers_would_make(pipe):
    refs = [_noise_image(80, 64, seed=1), _noise_image(80, 64, seed=2)]
    # A loaded PNG (uint8 / 255) comes back bit for bit: one reference per image of the batch.
    batch = _as_comfy_image(refs)
    ours = flux2.prepare_reference_pixels(batch)
    assert len(ours) == 2
    for got, ref in zip(ours, refs):
        assert torch.equal(got, _pipeline_pixels(pipe.image_processor, ref))
    # Any float image: rounded to uint8 as diffusers' numpy_to_pil rounds it (values outside [0, 1] clipped).
    floats = torch.rand(1, 40, 50, 3, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    [got] = flux2.prepare_reference_pixels(floats)
    [as_pil] = pipe.image_processor.numpy_to_pil(floats.clamp(0, 1).numpy())
    assert torch.equal(got, _pipeline_pixels(pipe.image_processor, as_pil))


@pytest.mark.parametrize(
    ("images", "match"),
    [
        ([_noise_image(15, 64, seed=0)], r"^reference_images is 15x64 \(WxH\), which leaves 0x64"),
        ([_noise_image(64, 64, seed=0), _noise_image(64, 10, seed=0)], r"^reference_images image 1 is 64x10"),
        (torch.zeros(1, 64, 64, 4), r"^reference_images must be an IMAGE batch \(B, H, W, 3\)"),
        (torch.zeros(64, 64, 3), r"^reference_images must be an IMAGE batch"),
        ([], r"^reference_images must be an IMAGE tensor .* or a non-empty list of PIL images"),
    ],
)
def test_prepare_reference_pixels_refuses_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        flux2.prepare_reference_pixels(images)


# ------------------------------------------------------------------------------------ whole renders


def test_sample_images_with_two_references_of_different_sizes_matches_the_pipeline(pipe, embeds, spec):
    # 80x64 (5x4 tokens) and 100x70 (floored to 96x64: 6x4 tokens, centre-cropped).
    refs = [_noise_image(80, 64, seed=3), _noise_image(100, 70, seed=4)]
    ours = inference.sample_images(
        spec, prompt_embeds=embeds, width=WIDTH, height=HEIGHT, num_steps=3, guidance=GUIDANCE, seed=5,
        reference_images=refs,
    )
    assert ours.shape == (2, HEIGHT, WIDTH, 3) and ours.dtype == torch.float32
    assert_close(ours, _pipeline_images(pipe, refs=refs, embeds=embeds, seed=5, steps=3), **PIPE_TOL)
    # The references matter, and so does their order (reference k sits at time position 10 + 10k; on the random
    # tiny model the order changes pixels by about 1e-3, 100x the tolerance above).
    plain = inference.sample_images(spec, prompt_embeds=embeds, width=WIDTH, height=HEIGHT, num_steps=3,
                                    guidance=GUIDANCE, seed=5)
    swapped = inference.sample_images(spec, prompt_embeds=embeds, width=WIDTH, height=HEIGHT, num_steps=3,
                                      guidance=GUIDANCE, seed=5, reference_images=refs[::-1])
    assert (plain - ours).abs().max() > 1e-3 and (swapped - ours).abs().max() > 1e-4


def test_sample_images_with_a_large_comfy_image_matches_the_pipeline(pipe, embeds, spec):
    # Above 1024^2 pixels: the pipeline shrinks it (Lanczos) to 1073x976, then crops to 1072x976 (4087 tokens).
    big = _noise_image(1100, 1000, seed=6)
    ours = inference.sample_images(
        spec, prompt_embeds=embeds[:1], width=WIDTH, height=HEIGHT, num_steps=2, guidance=GUIDANCE, seed=7,
        reference_images=_as_comfy_image([big]),
    )
    assert_close(ours, _pipeline_images(pipe, refs=[big], embeds=embeds[:1], seed=7, steps=2), **PIPE_TOL)


def test_a_too_small_reference_is_refused_before_weights_load(embeds, spec, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the reference images were checked")

    monkeypatch.setattr(inference, "_loaded_image_models", no_loading)
    with pytest.raises(ValueError, match=r"^reference_images is 64x12 \(WxH\)"):
        inference.sample_images(spec, prompt_embeds=embeds, width=WIDTH, height=HEIGHT, num_steps=1, guidance=GUIDANCE,
                                seed=0, reference_images=_as_comfy_image([_noise_image(64, 12, seed=0)]))


# --------------------------------------------------------------------------------------------- node


@pytest.fixture
def sample_node(pack, comfy_root, tiny_model_dir):
    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    pack_inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    pack_files = importlib.import_module(f"{pack.__name__}.trainer.model_files")
    model = pack_inference.Flux2ModelSpec(folder=pack_files.inspect_model_folder(tiny_model_dir), precision="fp32")
    yield model_nodes, pack_inference, model
    pack_inference.release_all()


def test_the_sample_node_declares_and_passes_reference_images(sample_node, pipe, embeds, monkeypatch):
    model_nodes, pack_inference, model = sample_node
    optional = model_nodes.Flux2Sample.INPUT_TYPES()["optional"]
    assert list(optional) == ["reference_images", "negative"] and optional["reference_images"][0] == "IMAGE"
    assert "each image of the batch becomes one reference" in optional["reference_images"][1]["tooltip"]

    refs = [_noise_image(80, 64, seed=8), _noise_image(80, 64, seed=9)]
    positive = [[embeds[1:], {}]]
    node = model_nodes.Flux2Sample()
    (images,) = node.sample(model, positive, WIDTH, HEIGHT, 2, GUIDANCE, 11, reference_images=_as_comfy_image(refs))
    assert_close(images, _pipeline_images(pipe, refs=refs, embeds=embeds[1:], seed=11, steps=2), **PIPE_TOL)
    # Unconnected (ComfyUI passes no keyword): plain text-to-image, as before.
    (plain,) = node.sample(model, positive, WIDTH, HEIGHT, 2, GUIDANCE, 11)
    assert_close(plain, _pipeline_images(pipe, refs=None, embeds=embeds[1:], seed=11, steps=2), **PIPE_TOL)

    # A bad reference names the node's input before any weights load.
    monkeypatch.setattr(pack_inference, "_loaded_image_models", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=r"^reference_images is 8x64"):
        node.sample(model, positive, WIDTH, HEIGHT, 2, GUIDANCE, 11,
                    reference_images=_as_comfy_image([_noise_image(8, 64, seed=0)]))
