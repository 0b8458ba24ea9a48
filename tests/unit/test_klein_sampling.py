"""FLUX.2 Sample on FLUX.2 [klein], held against diffusers' Flux2KleinPipeline on the tiny klein models: base with
classifier-free guidance (a connected negative, or the pipeline's own empty negative prompt), distilled without
(a connected negative ignored with a warning), dev refusing a negative, and conditioning from another model
refused before any weights load."""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, sampling
from flux2_lora_pack.trainer.flavours import DISTILLED_STEPS, PIPELINE_GUIDANCE, PIPELINE_STEPS
from flux2_lora_pack.trainer.model_files import inspect_model_folder

WIDTH, HEIGHT = 48, 32
PIPE_TOL = dict(atol=1e-5, rtol=0.0)  # as tests/unit/test_reference_sampling.py: fp32, same ops up to the decode


@pytest.fixture(scope="module")
def klein_base(tmp_path_factory) -> Path:
    from flux2_lora_pack.trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp("klein4_base") / "model", seed=0, flavour="klein-4b")


@pytest.fixture(scope="module")
def klein_distilled(tmp_path_factory) -> Path:
    from flux2_lora_pack.trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp("klein4_distilled") / "model", seed=1, flavour="klein-4b",
                     distilled=True)


def _pipe(folder: Path):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_pipe(klein_base):
    return _pipe(klein_base)


@pytest.fixture(scope="module")
def distilled_pipe(klein_distilled):
    return _pipe(klein_distilled)


@pytest.fixture
def nodes(pack, comfy_root):
    """(model_nodes module, inference module) of the pack, with the ComfyUI-like folders of comfy_root."""
    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    yield model_nodes, inference
    inference.release_all()


def _spec(inference, folder: Path):
    return inference.Flux2ModelSpec(folder=inspect_model_folder(folder), precision="fp32")


def _encode(pipe, prompts: list[str]) -> torch.Tensor:
    return flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, flavour="klein-4b")


def _pipeline_images(pipe, *, embeds, seed: int, steps: int, guidance: float, negative=None) -> torch.Tensor:
    noise = sampling.initial_noise(batch_size=embeds.shape[0], height_px=HEIGHT, width_px=WIDTH, seed=seed)
    images = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=noise, height=HEIGHT, width=WIDTH,
                  num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images
    return images.permute(0, 2, 3, 1)


def test_sample_defaults_are_the_pipelines_and_negative_is_optional(pack):
    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    spec = model_nodes.Flux2Sample.INPUT_TYPES()
    required, optional = spec["required"], spec["optional"]
    # Flux2Pipeline and Flux2KleinPipeline's num_inference_steps / guidance_scale defaults.
    assert (required["steps"][1]["default"], required["guidance"][1]["default"]) == (PIPELINE_STEPS, PIPELINE_GUIDANCE)
    assert (PIPELINE_STEPS, PIPELINE_GUIDANCE, DISTILLED_STEPS) == (50, 4.0, 4)
    # Appended after reference_images: saved workflows keep their widget values and links.
    assert list(optional) == ["reference_images", "negative"] and optional["negative"][0] == "CONDITIONING"
    # Unconnected, ComfyUI passes no keyword: the default must be "no negative".
    assert inspect.signature(model_nodes.Flux2Sample.sample).parameters["negative"].default is None


def test_klein_base_samples_with_cfg_as_flux2_klein_pipeline(nodes, base_pipe, klein_base, comfy_root):
    model_nodes, inference = nodes
    model = _spec(inference, klein_base)
    positive, negative = _encode(base_pipe, ["a red cube"]), _encode(base_pipe, ["blurry, low quality"])
    node = model_nodes.Flux2Sample()

    (given,) = node.sample(model, [[positive, {}]], WIDTH, HEIGHT, 3, 4.0, 5, negative=[[negative, {}]])
    assert_close(given, _pipeline_images(base_pipe, embeds=positive, negative=negative, seed=5, steps=3, guidance=4.0),
                 **PIPE_TOL)
    # Unconnected: the empty negative prompt, as the pipeline encodes it itself (through the on-disk text cache).
    (default,) = node.sample(model, [[positive, {}]], WIDTH, HEIGHT, 3, 4.0, 5)
    assert_close(default, _pipeline_images(base_pipe, embeds=positive, seed=5, steps=3, guidance=4.0), **PIPE_TOL)
    assert len(list(model_nodes.text_cache_dir().glob("*.safetensors"))) == 1  # "" was encoded once and cached
    assert (given - default).abs().max() > 1e-3  # the negative matters
    # guidance 1: no CFG, one model call per step, as the pipeline.
    (plain,) = node.sample(model, [[positive, {}]], WIDTH, HEIGHT, 3, 1.0, 5, negative=[[negative, {}]])
    assert_close(plain, _pipeline_images(base_pipe, embeds=positive, seed=5, steps=3, guidance=1.0), **PIPE_TOL)
    assert (plain - default).abs().max() > 1e-3


def test_distilled_klein_ignores_a_negative_with_a_warning(nodes, distilled_pipe, klein_distilled, caplog):
    model_nodes, inference = nodes
    model = _spec(inference, klein_distilled)
    positive = _encode(distilled_pipe, ["a red cube"])
    negative = _encode(distilled_pipe, [""])
    node = model_nodes.Flux2Sample()
    calls = []
    hook = distilled_pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        expected = _pipeline_images(distilled_pipe, embeds=positive, seed=3, steps=DISTILLED_STEPS, guidance=4.0)
    finally:
        hook.remove()
    assert len(calls) == DISTILLED_STEPS  # the pipeline itself runs no CFG on a distilled model

    with caplog.at_level(logging.INFO):
        (with_negative,) = node.sample(model, [[positive, {}]], WIDTH, HEIGHT, DISTILLED_STEPS, 4.0, 3,
                                       negative=[[negative, {}]])
    assert "FLUX.2 Sample: negative is ignored: the model is step-distilled (no CFG)." in caplog.text
    assert "guidance 4 is ignored" in caplog.text
    (without,) = node.sample(model, [[positive, {}]], WIDTH, HEIGHT, DISTILLED_STEPS, 4.0, 3)
    assert torch.equal(with_negative, without)
    assert_close(without, expected, **PIPE_TOL)
    assert "made for 4 steps" not in caplog.text
    with caplog.at_level(logging.INFO):
        node.sample(model, [[positive, {}]], WIDTH, HEIGHT, 2, 1.0, 3)  # allowed, with a hint
    assert "FLUX.2 [klein] 4B (distilled, 4 steps without CFG; " in caplog.text
    assert "is made for 4 steps; sampling with 2." in caplog.text


def test_dev_refuses_a_negative_before_loading_weights(nodes, tiny_model_dir, monkeypatch):
    model_nodes, inference = nodes
    monkeypatch.setattr(inference, "_loaded_image_models", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(inference, "encode_prompts_cached", lambda *a, **k: pytest.fail("text encoder loaded"))
    model = _spec(inference, tiny_model_dir)
    embeds = torch.zeros(1, 512, model.folder.transformer_config()["joint_attention_dim"])
    with pytest.raises(ValueError, match=r"^FLUX.2 Sample: negative is connected, but FLUX.2 \[dev\] has no "
                                         r"classifier-free guidance.*Disconnect negative"):
        model_nodes.Flux2Sample().sample(model, [[embeds, {}]], 64, 64, 2, 4.0, 0, negative=[[embeds, {}]])


@pytest.mark.parametrize("which", ["positive", "negative"])
def test_conditioning_from_another_model_is_refused_naming_both(nodes, klein_base, monkeypatch, which):
    model_nodes, inference = nodes
    monkeypatch.setattr(inference, "_loaded_image_models", lambda *a, **k: pytest.fail("weights loaded"))
    model = _spec(inference, klein_base)
    width = model.folder.transformer_config()["joint_attention_dim"]
    good, bad = torch.zeros(1, 512, width), torch.zeros(1, 512, width + 64)
    conditioning = {"positive": [[good, {}]], "negative": [[good, {}]]} | {which: [[bad, {}]]}
    with pytest.raises(ValueError, match=rf"^{which} has {width + 64} features per token, but this model "
                                         rf"\(FLUX.2 \[klein\] 4B \(base; .*\) takes {width}"):
        model_nodes.Flux2Sample().sample(model, conditioning["positive"], 64, 64, 2, 4.0, 0,
                                         negative=conditioning["negative"])
