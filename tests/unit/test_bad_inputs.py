"""Bad-input corpus: every case is refused with a ValueError naming the input, before any weights load or any
process starts, and nothing on disk is created or changed (the test snapshots the folders before and after).

Cases span config.json keys, node widgets, dataset files, model folders and LoRA files.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------- the world


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under roots (links not followed): mode, size, modification time."""
    out: dict[str, tuple[int, int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                st = (Path(dirpath) / name).lstat()
                out[os.path.join(dirpath, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


@dataclass
class World:
    root: Path
    comfy: Path
    model: Path
    manifest: Path
    pack: Any

    def mod(self, name: str):
        return importlib.import_module(f"{self.pack.__name__}.{name}")

    def config(self, **changes: Any) -> dict[str, Any]:
        base = {"pretrained_model_name_or_path": str(self.model), "output_dir": str(self.comfy / "output" / "run"),
                "dataset_manifest": str(self.manifest), "mixed_precision": "no"}
        base.update(changes)
        return base

    def model_spec(self):
        folder = self.mod("trainer.model_files").inspect_model_folder(self.model)
        return self.mod("trainer.inference").Flux2ModelSpec(folder=folder, precision="fp32")

    def train_node(self, **overrides: Any):
        nodes = self.mod("nodes.train_nodes")
        widgets = dict(max_train_steps=3, learning_rate=1e-3, lora_rank=4, lora_alpha=2.0, flux_lora_target="all",
                       train_batch_size=1, gradient_accumulation_steps=1, mixed_precision="no",
                       gradient_checkpointing=False, flux_guidance_value=1.0, caption_dropout_probability=0.0, seed=3,
                       checkpointing_steps=2, checkpoints_total_limit=2, validation_prompt="", validation_steps=0,
                       distributed="none", output_name="bad_input", launch="run", num_processes=1)
        widgets.update(overrides)
        dataset = nodes.DatasetHandle(manifest=str(self.manifest), fingerprint="f" * 16, num_images=8)
        return nodes.Flux2TrainLora().train(self.model_spec(), dataset, **widgets)

    def folder(self, name: str) -> Path:
        path = self.root / "made" / name
        path.mkdir(parents=True)
        return path


@pytest.fixture
def world(tmp_path, tiny_model_dir, pack, comfy_root) -> World:
    (comfy_root / "input").mkdir(exist_ok=True)
    manifest = tmp_path / "datasets" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}", encoding="utf-8")
    return World(root=tmp_path, comfy=comfy_root, model=tiny_model_dir, manifest=manifest, pack=pack)


@pytest.fixture
def no_expensive_work(monkeypatch, pack):
    """Loading weights, encoding, sampling or launching a process during a refused case fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("expensive work started before the bad input was refused")

    # Import first: modules that bind these names at import must keep the real ones after the test.
    model_files, inference, launch = (importlib.import_module(f"{pack.__name__}.trainer.{m}")
                                      for m in ("model_files", "inference", "launch"))
    for name in ("load_transformer", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(model_files, name, forbidden)
        monkeypatch.setattr(inference, name, forbidden)
    monkeypatch.setattr(launch.TrainingProcess, "start", classmethod(forbidden))
    monkeypatch.setattr(inference, "sample_images", forbidden)


# ------------------------------------------------------------------------------------------------- helpers


def train_config(world: World, **changes: Any):
    from flux2_lora_pack.trainer.config import TrainConfig

    return TrainConfig.from_dict(world.config(**changes))


def _copy_model_json(world: World, name: str) -> Path:
    dst = world.folder(name)
    for path in world.model.rglob("*.json"):
        target = dst / path.relative_to(world.model)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dst


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _model_folder_case(world: World, mutate: Callable[[Path], None]):
    from flux2_lora_pack.trainer.model_files import inspect_model_folder

    folder = _copy_model_json(world, "model")
    mutate(folder)
    return lambda: inspect_model_folder(folder)


def _lora_file(world: World, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = world.folder("loras") / name
    save_file(state, str(path))
    return path


def _fused_qkv_lora(hidden: int, *, rank: int = 4, block: int = 0, rank_b: int | None = None) -> dict:
    key = f"diffusion_model.double_blocks.{block}.img_attn.qkv"
    return {f"{key}.lora_A.weight": torch.zeros(3 * rank, hidden),
            f"{key}.lora_B.weight": torch.zeros(3 * hidden, rank_b or 3 * rank),
            f"{key}.alpha": torch.tensor(float(rank))}


def _apply_lora(world: World, path: Path):
    nodes = world.mod("nodes.train_nodes")
    return lambda: nodes.Flux2ApplyLora().apply(world.model_spec(), nodes.TrainedLora(path=str(path)), 1.0)


def _manifest_case(world: World, text: bytes):
    from flux2_lora_pack.trainer.manifest import load_manifest

    path = world.folder("ds") / "manifest.json"
    path.write_bytes(text)
    return lambda: load_manifest(path)


def _valid_manifest_with(latent: str) -> bytes:
    item = {"image": "a.png", "source": "s", "caption": "c", "image_sha256": "0", "width": 64, "height": 64,
            "bucket": [64, 64], "resized": [64, 64], "crop": [0, 0], "latent": latent, "text": "text/c.safetensors",
            "repeats": 1}
    data = {"format": "flux2-lora-dataset", "version": 2, "fingerprint": "f", "model_identity": "m",
            "vae_identity": "v", "text_identity": "t", "resolution": 64,
            "sources": [{"id": "s", "image_dir": "/x", "caption_strategy": "textfile", "resolution": 64,
                         "bucket_step": 64, "repeats": 1}],
            "items": [item], "text_cache": {"c": "text/c.safetensors", "": "text/e.safetensors"}, "empty_caption": ""}
    return json.dumps(data).encode()


def _scan(folder: Path):
    from flux2_lora_pack.trainer.scan import scan_image_folder

    return lambda: scan_image_folder(folder)


def _png(path: Path, size: int = 32) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), (200, 10, 10)).save(path)


def _non_utf8_caption(world: World):
    folder = world.folder("images")
    _png(folder / "a.png")
    (folder / "a.txt").write_bytes(b"caf\xe9 au lait")
    return _scan(folder)


def _truncated_image(world: World):
    folder = world.folder("images")
    _png(folder / "a.png")
    (folder / "a.png").write_bytes((folder / "a.png").read_bytes()[:-20])  # IDAT cut short, IEND gone
    (folder / "a.txt").write_text("a red square")
    return _scan(folder)


def _symlink_loop(world: World):
    folder = world.folder("images")
    (folder / "sub").mkdir()
    os.symlink(folder, folder / "sub" / "loop")
    os.symlink(folder / "sub", folder / "back")
    return _scan(folder)


def _preflight_rank(world: World):
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.preflight import lora_size

    config = train_config(world, lora_rank=100_000)
    return lambda: lora_size(inspect_model_folder(world.model), lora=config.lora)


def _non_utf8_config(world: World):
    from flux2_lora_pack.trainer.config import TrainConfig

    path = world.folder("cfg") / "config.json"
    path.write_bytes(json.dumps(world.config()).encode()[:-1] + b', "output_name": "\xff"}')
    return lambda: TrainConfig.from_json(path)


def _non_utf8_prompt_library(world: World):
    path = world.folder("cfg") / "prompts.json"
    path.write_bytes(b'{"a": "caf\xe9"}')
    return lambda: train_config(world, user_prompt_library=str(path))


def _ckpt_file(world: World, suffix: str) -> Path:
    path = world.folder("weights") / f"model{suffix}"
    path.write_bytes(b"PK\x03\x04 a pickle archive would be here")
    return path


def _config_with_file(world: World, key: str, path: Path):
    return lambda: train_config(world, **{key: str(path)})


# ------------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    names: str
    """Text the message must contain: the input's name (config key, widget, file)."""
    match: str
    """What else the message must say (regex)."""
    prepare: Callable[[World], Callable[[], Any]]
    """Creates the bad input on disk if needed; returns the action that must refuse it."""


CASES = [
    # config.json keys
    Case("config-wrong-type", "lora_rank", "must be a whole number", lambda w: lambda: train_config(w, lora_rank="sixteen")),
    Case("config-bool-for-int", "gradient_accumulation_steps", "whole number",
         lambda w: lambda: train_config(w, gradient_accumulation_steps=True)),
    Case("config-nan", "learning_rate", "finite", lambda w: lambda: train_config(w, learning_rate=math.nan)),
    Case("config-inf-string", "learning_rate", "finite", lambda w: lambda: train_config(w, learning_rate="inf")),
    Case("config-negative", "max_train_steps", ">= 1", lambda w: lambda: train_config(w, max_train_steps=-5)),
    Case("config-zero", "checkpointing_steps", ">= 1", lambda w: lambda: train_config(w, checkpointing_steps=0)),
    Case("config-zero-timeout", "collective_timeout_s", "> 0", lambda w: lambda: train_config(w, collective_timeout_s=0)),
    Case("config-out-of-range", "lora_dropout", r"\[0, 1\)", lambda w: lambda: train_config(w, lora_dropout=1.5)),
    Case("config-absurd-resolution", "validation_resolution", "above 8192",
         lambda w: lambda: train_config(w, validation_resolution="99999984")),
    Case("config-absurd-seed", "seed", "<=", lambda w: lambda: train_config(w, seed=2**40)),
    Case("config-absurd-rank-for-model", "lora_rank", "larger than the smallest layer", _preflight_rank),
    Case("config-unknown-key", "learning_rat", "did you mean 'learning_rate'", lambda w: lambda: train_config(w, learning_rat=1)),
    Case("config-unsupported-key", "push_to_hub", "does not support", lambda w: lambda: train_config(w, push_to_hub=True)),
    Case("config-unsupported-choice", "mixed_precision", "fp8 training is not implemented",
         lambda w: lambda: train_config(w, mixed_precision="fp8")),
    Case("config-hub-id", "pretrained_model_name_or_path", "cannot download",
         lambda w: lambda: train_config(w, pretrained_model_name_or_path="black-forest-labs/FLUX.2-dev")),
    Case("config-missing-manifest", "dataset_manifest", "does not exist",
         lambda w: lambda: train_config(w, dataset_manifest=str(w.root / "nope" / "manifest.json"))),
    Case("config-pickle-transformer", "pretrained_transformer_model_name_or_path", r"not a \.safetensors file",
         lambda w: _config_with_file(w, "pretrained_transformer_model_name_or_path", _ckpt_file(w, ".ckpt"))),
    Case("config-guidance-order", "flux_guidance_min", "above flux_guidance_max",
         lambda w: lambda: train_config(w, flux_guidance_mode="random-range", flux_guidance_min=4.0, flux_guidance_max=1.0)),
    Case("config-path-as-name", "output_name", "only letters", lambda w: lambda: train_config(w, output_name="../evil")),
    Case("config-missing-resume", "resume_from_checkpoint", "no checkpoint folder",
         lambda w: lambda: train_config(w, resume_from_checkpoint="checkpoint-7")),
    Case("config-not-an-object", "config", "JSON object",
         lambda w: lambda: importlib.import_module("flux2_lora_pack.trainer.config").TrainConfig.from_dict([1, 2])),
    Case("config-file-not-utf8", "config file", "not UTF-8", _non_utf8_config),
    Case("config-prompt-library-not-utf8", "user_prompt_library", "not UTF-8", _non_utf8_prompt_library),
    # node widgets
    Case("widget-output-name-traversal", "output_name", "plain name", lambda w: lambda: w.train_node(output_name="../escape")),
    Case("widget-output-name-absolute", "output_name", "plain name", lambda w: lambda: w.train_node(output_name="/etc/x")),
    Case("widget-output-name-reserved", "output_name", "not usable", lambda w: lambda: w.train_node(output_name="LPT1")),
    Case("widget-output-name-control", "output_name", "control characters",
         lambda w: lambda: w.train_node(output_name="bad\x1b[31mname")),
    Case("widget-extra-json-output-dir", "extra_config_json key 'output_dir'", "cannot be set here",
         lambda w: lambda: w.train_node(extra_config_json=json.dumps({"output_dir": str(w.root / "elsewhere")}))),
    Case("widget-extra-json-nan", "learning_rate", "finite",
         lambda w: lambda: w.train_node(extra_config_json='{"learning_rate": NaN}')),
    Case("widget-extra-json-invalid", "extra_config_json", "not valid JSON",
         lambda w: lambda: w.train_node(extra_config_json="{not json")),
    Case("widget-negative-steps", "max_train_steps", ">= 1", lambda w: lambda: w.train_node(max_train_steps=-1)),
    Case("widget-image-folder-traversal", "image_folder", "outside the folders",
         lambda w: lambda: w.mod("nodes.dataset_nodes").resolve_image_folder("../../../etc")),
    Case("widget-attach-outside-output", "attach_run_folder", "outside the folders",
         lambda w: lambda: w.train_node(launch="attach", attach_run_folder=str(w.root))),
    Case("widget-save-lora-traversal", "filename", "one subfolder",
         lambda w: lambda: w.mod("nodes.train_nodes").Flux2SaveLora().save(
             w.mod("nodes.train_nodes").TrainedLora(path=str(w.manifest)), "../../../x")),
    Case("widget-model-folder-outside", "folder_path", "outside the folders",
         lambda w: lambda: w.mod("nodes.model_nodes").Flux2LoadModel().load("x", "fp32", folder_path=str(w.root))),
    Case("widget-sample-width", "width", "multiple of 16",
         lambda w: lambda: w.mod("nodes.model_nodes").Flux2Sample().sample(w.model_spec(), None, 100, 64, 4, 4.0, 0)),
    Case("widget-sample-steps", "steps", r"^steps 0 must be >= 1",  # the node's input name, not num_steps
         lambda w: lambda: w.mod("nodes.model_nodes").Flux2Sample().sample(w.model_spec(), None, 64, 64, 0, 4.0, 0)),
    # dataset files
    Case("dataset-caption-not-utf8", "a.txt", "not UTF-8", _non_utf8_caption),
    Case("dataset-truncated-image", "a.png", "corrupt or truncated", _truncated_image),
    Case("dataset-symlink-loop", "image folder", "no usable images", _symlink_loop),
    Case("dataset-empty-folder", "image folder", "no usable images", lambda w: _scan(w.folder("empty"))),
    Case("manifest-escapes-folder", "../../etc/passwd", "points outside the dataset folder",
         lambda w: _manifest_case(w, _valid_manifest_with("../../etc/passwd"))),
    Case("manifest-not-utf8", "dataset manifest", "not valid JSON", lambda w: _manifest_case(w, b'{"a": "\xff"}')),
    Case("manifest-other-format", "dataset manifest", "not a flux2-lora-dataset manifest",
         lambda w: _manifest_case(w, b'{"format": "kohya"}')),
    # model folders
    Case("model-flux1", "model folder", "FLUX.1",
         lambda w: _model_folder_case(w, lambda d: _edit_json(d / "model_index.json", _class_name="FluxPipeline"))),
    Case("model-sdxl", "model folder", "SDXL", lambda w: _model_folder_case(
        w, lambda d: _edit_json(d / "model_index.json", _class_name="StableDiffusionXLPipeline"))),
    Case("model-missing", "model folder", "does not exist",
         lambda w: lambda: importlib.import_module("flux2_lora_pack.trainer.model_files").inspect_model_folder(w.root / "no-model")),
    Case("model-short-text-encoder", "text encoder", "at least 30", lambda w: _model_folder_case(
        w, lambda d: _edit_json(d / "text_encoder" / "config.json",
                                text_config={**json.loads((d / "text_encoder" / "config.json").read_text())["text_config"],
                                             "num_hidden_layers": 20}))),
    Case("model-index-not-utf8", "model_index.json", "not valid JSON",
         lambda w: _model_folder_case(w, lambda d: (d / "model_index.json").write_bytes(b"\xff\xfe{"))),
    # LoRA files
    Case("lora-ckpt", "LoRA file", "never unpickled", lambda w: _apply_lora(w, _ckpt_file(w, ".ckpt"))),
    Case("lora-pt", "LoRA file", "never unpickled", lambda w: _apply_lora(w, _ckpt_file(w, ".pt"))),
    Case("lora-sdxl-keys", "LoRA", "another model", lambda w: _apply_lora(w, _lora_file(w, "sdxl.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}))),
    Case("lora-rank-mismatch", "LoRA file", "same rank", lambda w: _apply_lora(
        w, _lora_file(w, "ranks.safetensors", _fused_qkv_lora(256, rank=4, rank_b=8)))),
    Case("lora-other-width", "LoRA file 'wide.safetensors'", "this model's layer has 256", lambda w: _apply_lora(
        w, _lora_file(w, "wide.safetensors", _fused_qkv_lora(512)))),
    Case("lora-more-blocks", "LoRA file 'deep.safetensors'", "does not have", lambda w: _apply_lora(
        w, _lora_file(w, "deep.safetensors", _fused_qkv_lora(256, block=7)))),
    Case("lora-truncated", "LoRA file", "not a readable safetensors file", lambda w: _apply_lora(
        w, _truncate(_lora_file(w, "cut.safetensors", _fused_qkv_lora(256))))),
]


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:100])
    return path


def test_the_corpus_covers_every_input_class():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    kinds = {c.id.split("-")[0] for c in CASES}
    assert kinds == {"config", "widget", "dataset", "manifest", "model", "lora"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_early_naming_the_input_and_changes_nothing(case, world, no_expensive_work):
    act = case.prepare(world)
    before = snapshot(world.root, world.model)
    with pytest.raises(ValueError) as info:
        act()
    message = str(info.value)
    assert case.names in message, message
    assert re.search(case.match, message), message
    assert snapshot(world.root, world.model) == before
