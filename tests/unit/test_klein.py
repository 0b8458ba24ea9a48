"""FLUX.2 [klein] 4B / 9B: the real sizes, the flavour read from a diffusers folder, the text conventions held
bit for bit against diffusers' own Flux2KleinPipeline, caches that never mix dev and klein, and make-tiny's
tiny klein models rendering through Flux2KleinPipeline."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer import flux2
from flux2_lora_pack.trainer.flavours import SPECS
from flux2_lora_pack.trainer.model_files import ModelFolder, inspect_model_folder

PROMPTS = [
    "a red cube on a blue floor",
    "",  # the empty prompt (caption dropout, and klein's negative prompt)
    "a photo of a yellow cat sitting on a wooden table, " * 60,  # far beyond 512 tokens
    "portrait [IMG] of a woman",  # klein keeps "[IMG]": there is no image token to protect
]


@pytest.fixture(scope="module")
def klein4_dir(tmp_path_factory) -> Path:
    from flux2_lora_pack.trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp("klein4") / "model", seed=0, flavour="klein-4b")


@pytest.fixture(scope="module")
def klein9_distilled_dir(tmp_path_factory) -> Path:
    from flux2_lora_pack.trainer.__main__ import main

    out = tmp_path_factory.mktemp("klein9") / "model"
    assert main(["make-tiny", "--out", str(out), "--flavour", "klein-9b", "--distilled"]) == 0
    return out


@pytest.fixture(scope="module")
def klein_pipe(klein4_dir):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(klein4_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _copy_configs(src: Path, dst: Path) -> Path:
    for path in src.rglob("*.json"):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dst


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(("flavour", "transformer_b", "text_encoder_b"),
                         [("dev", 32.22, None), ("klein-4b", 3.88, 4.02), ("klein-9b", 9.08, 8.19)])
def test_real_configs_build_the_advertised_sizes(flavour, transformer_b, text_encoder_b):
    """The configs in trainer/flavours.py make diffusers' transformer (and transformers' Qwen3) of the sizes the
    models are named for: FLUX.2-dev 32B, klein 4B / 9B, Qwen3-4B / Qwen3-8B (built on the meta device)."""
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = SPECS[flavour]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**spec.transformer)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(transformer_b, abs=0.01)
    assert (model.time_guidance_embed.guidance_embedder is not None) == spec.has_guidance_embedding
    assert model.inner_dim == {"dev": 6144, "klein-4b": 3072, "klein-9b": 4096}[flavour]  # heads x 128
    assert (model.config.num_layers, model.config.num_single_layers) == spec.block_counts
    assert spec.transformer["joint_attention_dim"] == 3 * spec.text_encoder["hidden_size"]
    if text_encoder_b is not None:
        with torch.device("meta"):
            encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, head_dim=128, **spec.text_encoder,
                                                   tie_word_embeddings=flavour == "klein-4b"))
        assert sum(p.numel() for p in encoder.parameters()) / 1e9 == pytest.approx(text_encoder_b, abs=0.01)
        assert spec.text_hidden_layers == (9, 18, 27) and spec.pipeline_class == "Flux2KleinPipeline"


# ------------------------------------------------------------------------------------------------ folders


def test_folders_say_their_flavour(tiny_model_dir, klein4_dir, klein9_distilled_dir):
    dev, k4, k9 = (inspect_model_folder(d) for d in (tiny_model_dir, klein4_dir, klein9_distilled_dir))
    assert [(f.flavour, f.is_distilled) for f in (dev, k4, k9)] == [("dev", False), ("klein-4b", False), ("klein-9b", True)]
    assert k4.describe() == "FLUX.2 [klein] 4B (base; Qwen3-4B text encoder, 5 + 20 blocks, no guidance embedding)"
    assert k9.describe().startswith("FLUX.2 [klein] 9B (distilled, 4 steps without CFG; Qwen3-8B")
    assert dev.describe() == ("FLUX.2 [dev] (Mistral-Small-3.1-24B text encoder, 8 + 48 blocks, guidance embedding)")
    # The tiny klein models keep the real block counts (what TREAD's indices and the detection read).
    config = k9.transformer_config()
    assert (config["num_layers"], config["num_single_layers"], config["guidance_embeds"]) == (8, 24, False)
    assert json.loads((klein9_distilled_dir / "model_index.json").read_text())["is_distilled"] is True


def test_model_folder_stays_a_frozen_slotted_handle(klein9_distilled_dir):
    folder = inspect_model_folder(klein9_distilled_dir)
    assert not hasattr(folder, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        folder.flavour = "dev"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(folder)) == folder  # ComfyUI keeps and copies node outputs
    assert dataclasses.replace(folder, flavour="klein-4b").flavour == "klein-4b"
    assert ModelFolder(root=folder.root).flavour == "dev"  # old handles (no flavour field) read as dev


def test_a_flavour_that_contradicts_the_folder_names_both(tiny_model_dir, klein4_dir):
    with pytest.raises(ValueError, match=r"model_flavour 'dev' \(FLUX.2 \[dev\]\) does not match the model folder "
                                         r".*holds 'klein-4b': FLUX.2 \[klein\] 4B \(base.*Set model_flavour to 'klein-4b'"):
        inspect_model_folder(klein4_dir, flavour="dev")
    with pytest.raises(ValueError, match=r"model_flavour 'klein-9b' .*holds 'dev': FLUX.2 \[dev\]"):
        inspect_model_folder(tiny_model_dir, flavour="klein-9b")
    assert inspect_model_folder(klein4_dir, flavour="klein-4b").flavour == "klein-4b"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: _edit(d / "transformer" / "config.json", num_single_layers=7),
         r"5 double \+ 7 single blocks, which is neither klein size \(klein-4b: 5 \+ 20; klein-9b: 8 \+ 24\)"),
        (lambda d: _edit(d / "transformer" / "config.json", guidance_embeds=True), r"FLUX.2 \[klein\] 4B has no guidance"),
        (lambda d: _edit(d / "model_index.json", text_encoder=["transformers", "Mistral3ForConditionalGeneration"]),
         r"text_encoder=.*expected Qwen3ForCausalLM; this is not a FLUX.2 klein folder"),
        (lambda d: _edit(d / "model_index.json", is_distilled="yes"), r"is_distilled='yes' must be true or false"),
        (lambda d: _edit(d / "text_encoder" / "config.json", num_hidden_layers=26), r"needs at least 27"),
        (lambda d: _edit(d / "text_encoder" / "config.json", hidden_size=64), r"do not belong together"),
    ],
)
def test_wrong_klein_folders_are_refused(klein4_dir, tmp_path, mutate, match):
    folder = _copy_configs(klein4_dir, tmp_path / "model")
    mutate(folder)
    with pytest.raises(ValueError, match=match):
        inspect_model_folder(folder)


def test_dev_pipeline_with_qwen_is_refused(tiny_model_dir, tmp_path):
    folder = _copy_configs(tiny_model_dir, tmp_path / "model")
    _edit(folder / "model_index.json", text_encoder=["transformers", "Qwen3ForCausalLM"])
    with pytest.raises(ValueError, match=r"expected Mistral3ForConditionalGeneration; this is not a FLUX.2 dev folder"):
        inspect_model_folder(folder)


# ---------------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("flavour", ["dev", "klein-4b", "klein-9b"])
def test_hidden_layers_and_length_are_the_pipelines_defaults(flavour):
    import inspect

    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    pipeline = Flux2Pipeline if flavour == "dev" else Flux2KleinPipeline
    params = inspect.signature(pipeline.encode_prompt).parameters
    assert flux2.text_hidden_layers(flavour) == tuple(params["text_encoder_out_layers"].default)
    assert flux2.MAX_TEXT_TOKENS == params["max_sequence_length"].default
    assert SPECS[flavour].pipeline_class == pipeline.__name__


def test_chat_text_is_the_qwen3_generation_prompt_without_thinking(klein_pipe):
    assert flux2.format_klein_prompt(klein_pipe.tokenizer, "a cat") == (
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tokenize_matches_flux2_klein_pipeline(klein_pipe):
    tokenizer = klein_pipe.tokenizer
    ids, mask, truncated = flux2.tokenize_prompts(tokenizer, PROMPTS, flavour="klein-4b")
    # The calls Flux2KleinPipeline._get_qwen3_prompt_embeds makes, one prompt at a time.
    for row, prompt in enumerate(PROMPTS):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        expected = tokenizer(text, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
        assert torch.equal(ids[row : row + 1], expected["input_ids"])
        assert torch.equal(mask[row : row + 1], expected["attention_mask"])
    assert ids.shape == (len(PROMPTS), 512) and truncated == [False, False, True, False]
    assert tokenizer.padding_side == "right" and mask[0, 0] == 1 and mask[0, -1] == 0
    assert "[IMG]" in tokenizer.decode(ids[3][mask[3].bool()])
    exact = int(mask[0].sum())
    assert flux2.tokenize_prompts(tokenizer, [PROMPTS[0]], max_length=exact, flavour="klein-9b")[2] == [False]
    assert flux2.tokenize_prompts(tokenizer, [PROMPTS[0]], max_length=exact - 1, flavour="klein-9b")[2] == [True]


def test_encode_matches_flux2_klein_pipeline_bit_for_bit(klein_pipe):
    ours = flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer, PROMPTS, flavour="klein-4b")
    assert ours.shape == (len(PROMPTS), 512, 3 * 32) and not ours.requires_grad
    with torch.no_grad():
        expected = klein_pipe._get_qwen3_prompt_embeds(klein_pipe.text_encoder, klein_pipe.tokenizer, PROMPTS)
        embeds, text_ids = klein_pipe.encode_prompt(prompt=PROMPTS, device=torch.device("cpu"))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, embeds, rtol=0, atol=0)
    assert torch.equal(flux2.text_position_ids(len(PROMPTS), 512), text_ids)
    # Per token, features [k*H:(k+1)*H] are hidden state (9, 18, 27)[k].
    ids, mask, _ = flux2.tokenize_prompts(klein_pipe.tokenizer, PROMPTS[:1], flavour="klein-4b")
    with torch.no_grad():
        hidden = klein_pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours[:1, :, 32:64], hidden[18], rtol=0, atol=0)
    # Other layers give other features: the (9, 18, 27) default is what makes the match.
    other = flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer, PROMPTS[:1], flavour="klein-4b",
                                 hidden_layers=(10, 18, 27))
    assert not torch.equal(other, ours[:1])
    with pytest.raises(ValueError, match=r"not a FLUX.2 flavour; choose one of \['dev', 'klein-4b', 'klein-9b'\]"):
        flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer, ["x"], flavour="klein")


def test_negative_prompt_is_the_empty_prompt_as_the_pipeline_guides(klein_pipe):
    """With CFG on a base klein, the pipeline's second transformer call gets the encoding of "" (its only negative
    prompt): what KLEIN_NEGATIVE_PROMPT encodes to with our conventions."""
    seen: list[torch.Tensor] = []
    hook = klein_pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        klein_pipe(prompt=PROMPTS[0], height=32, width=32, num_inference_steps=1, guidance_scale=4.0,
                   output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(seen) == 2  # conditional, then unconditional
    ours = flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer,
                                [PROMPTS[0], flux2.KLEIN_NEGATIVE_PROMPT], flavour="klein-4b")
    torch.testing.assert_close(seen[0], ours[:1], rtol=0, atol=0)
    torch.testing.assert_close(seen[1], ours[1:], rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- caches


def test_dev_and_klein_text_caches_never_mix(tiny_model_dir, klein4_dir, klein9_distilled_dir, klein_pipe, tmp_path):
    from flux2_lora_pack.trainer.cache_fill import encoder_identities
    from flux2_lora_pack.trainer.inference import Flux2ModelSpec, encode_prompts_cached, text_embedding_cache_key

    folders = [inspect_model_folder(d) for d in (tiny_model_dir, klein4_dir, klein9_distilled_dir)]
    specs = [Flux2ModelSpec(folder=f, precision="fp32") for f in folders]
    keys = {text_embedding_cache_key(s, "a red cube", max_length=512) for s in specs}
    assert len(keys) == 3
    assert len({encoder_identities(f)["text"] for f in folders}) == 3  # Build Dataset's caption cache keys
    # One cache folder shared by a dev and a klein handle: each gets its own encoding of the same prompt.
    dev, _ = encode_prompts_cached(specs[0], ["a red cube"], cache_dir=tmp_path)
    klein, _ = encode_prompts_cached(specs[1], ["a red cube"], cache_dir=tmp_path)
    again, _ = encode_prompts_cached(specs[1], ["a red cube"], cache_dir=tmp_path)  # now from the cache
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and dev.shape == klein.shape
    with torch.no_grad():
        expected = klein_pipe.encode_prompt(prompt=["a red cube"], device=torch.device("cpu"))[0]
    torch.testing.assert_close(klein, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert not torch.equal(dev, klein)


def test_build_dataset_caches_klein_captions_as_the_pipeline_encodes(klein4_dir, klein_pipe, tmp_path):
    from image_tools import noise_png

    from flux2_lora_pack.trainer.build import build_dataset
    from flux2_lora_pack.trainer.manifest import load_manifest, load_text_embedding

    noise_png(tmp_path / "images" / "0.png", (64, 64), seed=0, caption="a blue ball")
    manifest = load_manifest(build_dataset(image_dir=tmp_path / "images", model=inspect_model_folder(klein4_dir),
                                           out_dir=tmp_path / "built", resolution=64, text_precision="fp32"))
    with torch.no_grad():
        expected = klein_pipe.encode_prompt(prompt=["a blue ball", ""], device=torch.device("cpu"))[0]
    torch.testing.assert_close(load_text_embedding(manifest, "a blue ball"), expected[:1], rtol=0, atol=0)
    torch.testing.assert_close(load_text_embedding(manifest, ""), expected[1:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ tiny, nodes


@pytest.mark.parametrize("which", ["base", "distilled"])
def test_tiny_klein_renders_through_flux2_klein_pipeline(which, klein_pipe, klein9_distilled_dir):
    from diffusers import Flux2KleinPipeline

    pipe = klein_pipe if which == "base" else Flux2KleinPipeline.from_pretrained(klein9_distilled_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.is_distilled is (which == "distilled")
    images = pipe(prompt="a red cube", height=64, width=48, num_inference_steps=2, guidance_scale=4.0,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 48, 3)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01


def test_make_tiny_refuses_what_does_not_exist(tmp_path):
    from flux2_lora_pack.trainer.__main__ import main
    from flux2_lora_pack.trainer.tiny import make_tiny

    with pytest.raises(ValueError, match="only FLUX.2 \\[klein\\] has a step-distilled variant"):
        make_tiny(out_dir=tmp_path / "a", flavour="dev", distilled=True)
    with pytest.raises(ValueError, match=r"'klein-2b' is not a FLUX.2 flavour"):
        make_tiny(out_dir=tmp_path / "b", flavour="klein-2b")
    with pytest.raises(SystemExit):  # argparse lists the choices
        main(["make-tiny", "--out", str(tmp_path / "c"), "--flavour", "schnell"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_flux2_node_says_which_flavour_it_found(pack, comfy_root, klein9_distilled_dir, caplog):
    import importlib

    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    shutil.copytree(klein9_distilled_dir, comfy_root / "models" / "diffusers" / "klein")
    with caplog.at_level(logging.INFO, logger="flux2_lora"):
        (spec,) = model_nodes.Flux2LoadModel().load("klein", "fp32")
    assert (spec.folder.flavour, spec.folder.is_distilled) == ("klein-9b", True)
    assert "holds model_flavour 'klein-9b': FLUX.2 [klein] 9B (distilled" in caplog.text


def test_train_lora_passes_the_flavour_load_flux2_found(pack, klein4_dir, tmp_path):
    import importlib

    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.inference import Flux2ModelSpec

    train_nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    handle = train_nodes.DatasetHandle(manifest=str(manifest), fingerprint="x", num_images=1)
    config = train_nodes.run_config(Flux2ModelSpec(folder=inspect_model_folder(klein4_dir)), datasets=[handle],
                                    name="k", run_dir=tmp_path / "run", settings={})
    assert config["model_flavour"] == "klein-4b"
    assert TrainConfig.from_dict(config).model.flavour == "klein-4b"


# -------------------------------------------------------------------------------------------------- config


def _config(model: Path, tmp_path: Path, **overrides):
    from flux2_lora_pack.trainer.config import TrainConfig

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    return TrainConfig.from_dict({"pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
                                  "dataset_manifest": str(manifest), **overrides})


def test_config_checks_model_flavour_against_the_folder(tiny_model_dir, klein4_dir, klein9_distilled_dir, tmp_path):
    assert _config(klein9_distilled_dir, tmp_path, model_flavour="klein-9b").model.flavour == "klein-9b"
    with pytest.raises(ValueError, match=r"model_flavour 'klein-9b' \(FLUX.2 \[klein\] 9B\) does not match the model "
                                         r"folder .*which holds 'klein-4b'"):
        _config(klein4_dir, tmp_path, model_flavour="klein-9b")
    with pytest.raises(ValueError, match=r"model_flavour 'dev' .*holds 'klein-4b'"):
        _config(klein4_dir, tmp_path)  # the default flavour is dev
    with pytest.raises(ValueError, match=r"model_flavour 'klein-4b' .*holds 'dev'"):
        _config(tiny_model_dir, tmp_path, model_flavour="klein-4b")
    with pytest.raises(ValueError, match=r"model_flavour 'klein-4b' .*needs its diffusers folder: .*holds no FLUX.2 "
                                         r"model_index.json.*FLUX.2-klein-base-4B"):
        _config(tmp_path, tmp_path, model_flavour="klein-4b")


@pytest.mark.parametrize("guidance", [{"flux_guidance_value": 3.5}, {"flux_guidance_mode": "random-range"},
                                      {"flux_guidance_mode": "random-range", "flux_guidance_max": 2.0}])
def test_flux_guidance_settings_are_refused_for_klein_saying_why(klein4_dir, tmp_path, guidance):
    given = ", ".join(f"{k}={v!r}" for k, v in guidance.items())
    with pytest.raises(ValueError, match=rf"{re.escape(given)}: FLUX.2 \[klein\] 4B has no guidance embedding "
                                         r"\(its transformer has guidance_embeds false\)"):
        _config(klein4_dir, tmp_path, model_flavour="klein-4b", **guidance)
    config = _config(klein4_dir, tmp_path, model_flavour="klein-4b", flux_guidance_value=1.0)  # the default: unread
    assert type(config).from_dict(config.to_dict()) == config  # run.json round trip (it lists every key)


# ---------------------------------------------------------------------------------------------- sampling


def test_denoise_with_cfg_matches_flux2_klein_pipeline(klein_pipe):
    from flux2_lora_pack.trainer import sampling

    embeds = flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer, ["a red cube", "a dog"],
                                  flavour="klein-4b")
    negative = flux2.encode_prompts(klein_pipe.text_encoder, klein_pipe.tokenizer, [flux2.KLEIN_NEGATIVE_PROMPT],
                                    flavour="klein-4b")
    noise = sampling.initial_noise(batch_size=2, height_px=32, width_px=48, seed=1)
    assert not sampling.has_guidance_embedding(klein_pipe.transformer)
    for scale, neg in ((4.0, negative), (1.0, negative), (4.0, None)):  # CFG; scale 1: off; distilled: no negative
        ours = sampling.denoise(klein_pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=3,
                                guidance=scale, negative_prompt_embeds=neg)
        klein_pipe.register_to_config(is_distilled=neg is None)
        try:
            expected = klein_pipe(prompt_embeds=embeds, latents=noise, height=32, width=48, num_inference_steps=3,
                                  guidance_scale=scale, output_type="latent").images
        finally:
            klein_pipe.register_to_config(is_distilled=False)
        # Flux2KleinPipeline's "latent" output is already denormalised and unpatchified (B, 32, 2h, 2w).
        ours_vae = flux2.unpatchify_latents(flux2.denormalize_latents(ours, vae=klein_pipe.vae))
        torch.testing.assert_close(ours_vae, expected, rtol=0, atol=1e-6)
    plain = sampling.denoise(klein_pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=3, guidance=4.0)
    guided = sampling.denoise(klein_pipe.transformer, prompt_embeds=embeds, latents=noise, num_steps=3, guidance=4.0,
                              negative_prompt_embeds=negative)
    assert (plain - guided).abs().max() > 1e-3  # CFG does change the result


def test_dev_refuses_a_negative_prompt(tiny_pipeline):
    from flux2_lora_pack.trainer import sampling

    embeds = torch.zeros(1, 512, 96)
    with pytest.raises(ValueError, match="has a guidance embedding .*pass no negative prompt"):
        sampling.denoise(tiny_pipeline.transformer, prompt_embeds=embeds, latents=torch.zeros(1, 128, 2, 2),
                         num_steps=1, guidance=4.0, negative_prompt_embeds=embeds)


def test_training_passes_no_guidance_to_klein(klein_pipe):
    """prepare_batch draws guidance last: without a guidance embedding nothing else changes, and the transformer
    gets guidance=None (as Flux2KleinPipeline calls it)."""
    from flux2_lora_pack.trainer.config import ObjectiveConfig
    from flux2_lora_pack.trainer.objective import flow_matching_loss, prepare_batch, sample_generators

    spec = ObjectiveConfig()
    kwargs = dict(latents=torch.randn(2, 128, 2, 2), prompt_embeds=torch.randn(2, 512, 96), empty_embeds=None, spec=spec)
    dev = prepare_batch(**kwargs, generators=sample_generators(seed=0, step=0, first_index=0, count=2))
    klein = prepare_batch(**kwargs, generators=sample_generators(seed=0, step=0, first_index=0, count=2),
                          guidance_embeds=False)
    assert klein.guidance is None and dev.guidance is not None
    assert torch.equal(klein.hidden_states, dev.hidden_states) and torch.equal(klein.sigmas, dev.sigmas)
    seen = []
    hook = klein_pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["guidance"]),
                                                            with_kwargs=True)
    try:
        loss = flow_matching_loss(klein_pipe.transformer, klein, device=torch.device("cpu"), dtype=torch.float32)
    finally:
        hook.remove()
    assert seen == [None] and torch.isfinite(loss)
