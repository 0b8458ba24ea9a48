"""validation_reference_images: the config key's checks, the Train LoRA node's path check, and what the loop
hands the sampler (the reference latents, encoded once as Flux2Pipeline encodes `image=`)."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_lora_pack.trainer import flux2, sampling, validation
from flux2_lora_pack.trainer.model import Model
from flux2_lora_pack.trainer.config import TrainConfig

KEY = "validation_reference_images"


def _png(path: Path, size: tuple[int, int], *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _config(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "manifest.json").write_text("{}")
    return {"pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(tmp_path / "manifest.json"), "validation_prompt": "make it red", **overrides}


# ------------------------------------------------------------------------------------------ config


def test_one_path_or_a_list_becomes_the_validation_settings(tmp_path):
    a, b = _png(tmp_path / "a.png", (64, 48)), _png(tmp_path / "b.jpg", (40, 80))
    assert TrainConfig.from_dict(_config(tmp_path)).validation.reference_images == ()
    one = TrainConfig.from_dict(_config(tmp_path, **{KEY: str(a)}))
    assert one.validation_reference_images == str(a) and one.validation.reference_images == (a,)
    two = TrainConfig.from_dict(_config(tmp_path, **{KEY: [str(b), str(a)]}))
    assert two.validation.reference_images == (b, a)  # order kept: it sets each reference's time position
    assert TrainConfig.from_dict(json.loads(json.dumps(two.to_dict()))) == two


P = r"^validation_reference_images '.*"  # the key, then the path


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: str(d / "missing.png"), P + r"missing\.png' does not exist; give an image file"),
        (lambda d: str(d), P + r"' is a folder; give an image file"),
        (lambda d: _text(d / "notes.png"), P + r"notes\.png' is not an image file PIL can read"),
        (lambda d: _truncated(d / "cut.png"), P + r"cut\.png' cannot be read as an image"),
        (lambda d: str(_png(d / "thin.png", (64, 12))), P + r"thin\.png' is 64x12 \(WxH\), which leaves 64x0"),
        (lambda d: [str(_png(d / "ok.png", (32, 32))), str(d / "gone.png")], P + r"gone\.png' does not exist"),
        (lambda d: [str(_png(d / "ok.png", (32, 32)))] * 2, r"^validation_reference_images lists a path twice .*; "
                                                            "give each file once"),
        (lambda d: "  ", r"^validation_reference_images holds a blank path"),
        (lambda d: [], r"^validation_reference_images must be a path or a non-empty list of paths"),
        (lambda d: 3, r"^validation_reference_images must be a path or a non-empty list of paths"),
    ],
)
def test_bad_reference_images_are_refused_naming_the_key_and_the_path(tmp_path, make, match):
    refs = tmp_path / "refs"
    refs.mkdir()
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(_config(tmp_path, **{KEY: make(refs)}))


def _text(path: Path) -> str:
    path.write_text("not an image", encoding="utf-8")
    return str(path)


def _truncated(path: Path) -> str:
    _png(path, (64, 64))
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def test_references_without_a_validation_prompt_warn(tmp_path, caplog):
    image = _png(tmp_path / "a.png", (32, 32))
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.config"):
        TrainConfig.from_dict(_config(tmp_path, validation_prompt=None, **{KEY: str(image)}))
    assert [r.getMessage() for r in caplog.records] == [
        f"config: {KEY}={str(image)!r} has no effect because there is no validation prompt."]


# ------------------------------------------------------------------------------------------- loop


def test_references_are_encoded_once_as_the_pipeline_encodes_them(tiny_pipeline, tmp_path):
    paths = (_png(tmp_path / "a.png", (80, 64), seed=1), _png(tmp_path / "b.png", (70, 100), seed=2))
    latents = validation.validation_reference_latents(paths, vae=tiny_pipeline.vae, device=torch.device("cpu"))
    assert [tuple(t.shape) for t in latents] == [(1, 128, 4, 5), (1, 128, 6, 4)]
    # The pipeline's own preparation (reading the files as it would be given them) and its VAE encode.
    images = [Image.open(p) for p in paths]
    expected, ids = tiny_pipeline.prepare_image_latents(
        images=[tiny_pipeline.image_processor.preprocess(im, height=im.height // 16 * 16, width=im.width // 16 * 16,
                                                         resize_mode="crop") for im in images],
        batch_size=1, generator=None, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(torch.cat([flux2.pack_latents(t) for t in latents], dim=1), expected)
    assert torch.equal(flux2.reference_position_ids([(4, 5), (6, 4)], 1), ids)
    assert validation.validation_reference_latents((), vae=tiny_pipeline.vae, device=torch.device("cpu")) is None


def test_run_validation_gives_every_prompt_the_references(monkeypatch, tmp_path):
    from flux2_lora_pack.trainer.parallelize import DistEnv

    seen = []

    def fake_generate_images(transformer, vae, **kwargs):
        seen.append((kwargs["reference_latents"], kwargs["reference_timestep"]))
        return torch.zeros(1, 16, 16, 3)

    monkeypatch.setattr(sampling, "generate_images", fake_generate_images)
    module = torch.nn.Linear(2, 2)
    model = Model(module=module, inner=module, compute_dtype=torch.float32, hidden_size=2)
    settings = SimpleNamespace(width=16, height=16, num_inference_steps=1, guidance=4.0, seed=0, num_images=1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    refs = [torch.ones(1, 128, 1, 1)]
    prompts = [("a", "first", torch.zeros(4, 96)), ("b", "second", torch.zeros(4, 96))]
    records = validation.run_validation(model, None, prompts=prompts, settings=settings, step=3, out_dir=tmp_path, env=env,
                                  reference_timestep="zero", reference_latents=refs)
    assert [(r is refs, mode) for r, mode in seen] == [(True, "zero"), (True, "zero")]
    assert [r["path"] for r in records] == ["validation/step000003_a.png", "validation/step000003_b.png"]
    validation.run_validation(model, None, prompts=prompts[:1], settings=settings, step=4, out_dir=tmp_path, env=env)
    assert seen[-1] == (None, "shared")  # without references, as before


def test_num_validation_images_renders_each_prompt_with_consecutive_seeds(monkeypatch, tmp_path):
    from flux2_lora_pack.trainer.parallelize import DistEnv

    seeds = []

    def fake_generate_images(transformer, vae, **kwargs):
        seeds.append(kwargs["seed"])
        return torch.full((1, 16, 16, 3), kwargs["seed"] / 20)

    monkeypatch.setattr(sampling, "generate_images", fake_generate_images)
    module = torch.nn.Linear(2, 2)
    model = Model(module=module, inner=module, compute_dtype=torch.float32, hidden_size=2)
    settings = SimpleNamespace(width=16, height=16, num_inference_steps=1, guidance=4.0, seed=5, num_images=3)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    prompts = [("a", "first", torch.zeros(4, 96)), ("b", "second", torch.zeros(4, 96))]
    records = validation.run_validation(model, None, prompts=prompts, settings=settings, step=2, out_dir=tmp_path,
                                        env=env)
    assert seeds == [5, 6, 7, 5, 6, 7]
    assert [(r["path"], r["seed"]) for r in records] == [
        (f"validation/step000002_{name}_{k}.png", 4 + k) for name in ("a", "b") for k in (1, 2, 3)]
    assert Image.open(tmp_path / records[2]["path"]).getpixel((0, 0)) == (89, 89, 89)  # seed 7 -> 0.35 * 255


# ------------------------------------------------------------------------------------------- node


@pytest.fixture
def train_nodes(pack, comfy_root):
    (comfy_root / "input").mkdir(exist_ok=True)
    return importlib.import_module(f"{pack.__name__}.nodes.train_nodes")


def test_the_node_keeps_reference_images_inside_the_dataset_folders(train_nodes, comfy_root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    for value in (str(outside / "secret.png"), ["ref.png", str(outside / "secret.png")], "../../x.png"):
        with pytest.raises(ValueError, match=rf"^extra_config_json {KEY} .* is outside the folders"):
            train_nodes.check_extra_paths({KEY: value})
    inputs = comfy_root / "input"
    extra = {KEY: "refs/a.png"}
    train_nodes.check_extra_paths(extra)
    assert extra == {KEY: str(inputs / "refs" / "a.png")}  # relative: inside ComfyUI's input folder
    extra = {f"--{KEY}": ["a.png", str(inputs / "b.png")]}
    train_nodes.check_extra_paths(extra)
    assert extra == {f"--{KEY}": [str(inputs / "a.png"), str(inputs / "b.png")]}
    # Not a path or a list of paths: left for TrainConfig to refuse by name.
    for value in (None, 3, [3]):
        extra = {KEY: value}
        train_nodes.check_extra_paths(extra)
        assert extra == {KEY: value}
