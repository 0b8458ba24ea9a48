"""Build progress and Cancel: the callback sees every phase, and a build cancelled mid-way keeps what it
encoded, writes no manifest, and the next build encodes only the rest (counters prove it)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from image_tools import noise_png

from flux2_lora_pack.trainer.build import build_dataset
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.manifest import MANIFEST_FILE, load_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return inspect_model_folder(tiny_model_dir)


def _folder(root: Path) -> Path:
    for n in range(5):
        noise_png(root / "imgs" / f"{n}.png", (64, 64), seed=n, caption=f"caption {n}")
    return root / "imgs"


def _build(folder: Path, model, out: Path, progress) -> Path:
    return build_dataset(image_dir=folder, model=model, out_dir=out, resolution=64, text_precision="fp32",
                         vae_batch_size=2, text_batch_size=2, progress=progress)


def test_progress_reports_every_phase_in_order(tmp_path, model):
    calls: list[tuple[str, int, int]] = []
    _build(_folder(tmp_path), model, tmp_path / "out", lambda *a: calls.append(a))
    scans = [c for c in calls if c[0] == "scan"]
    assert [c[1] for c in scans] == list(range(10)) and {c[2] for c in scans} == {0}  # 5 images + 5 captions
    assert [c for c in calls if c[0] == "latents"] == [("latents", 0, 5), ("latents", 2, 5), ("latents", 4, 5),
                                                        ("latents", 5, 5)]
    # 5 captions + "" (caption dropout), batches of 2.
    assert [c for c in calls if c[0] == "captions"] == [("captions", 0, 6), ("captions", 2, 6), ("captions", 4, 6),
                                                         ("captions", 6, 6)]
    assert [c[0] for c in calls] == ["scan"] * 10 + ["latents"] * 4 + ["captions"] * 4
    again: list[tuple[str, int, int]] = []
    _build(tmp_path / "imgs", model, tmp_path / "out", lambda *a: again.append(a))
    assert {c[0] for c in again} == {"scan"}  # everything cached: no encoder phase at all


@pytest.mark.parametrize("phase", ["latents", "captions"])
def test_a_cancelled_build_keeps_its_cache_and_the_next_one_finishes_it(tmp_path, model, phase):
    folder, out = _folder(tmp_path), tmp_path / "out"

    def cancel_after_first_batch(name: str, done: int, total: int) -> None:
        if name == phase and done > 0:
            raise Cancelled

    with pytest.raises(Cancelled):
        _build(folder, model, out, cancel_after_first_batch)
    assert not (out / MANIFEST_FILE).exists()  # nothing half-built is offered for training
    _build(folder, model, out, None)
    report = load_build_report(out)
    if phase == "latents":
        assert (report.vae_images_encoded, report.latents_reused) == (3, 2)
        assert (report.prompts_encoded, report.prompts_reused) == (6, 0)
    else:
        assert (report.vae_images_encoded, report.latents_reused) == (0, 5)
        assert (report.prompts_encoded, report.prompts_reused) == (4, 2)
    assert len(load_manifest(out).items) == 5


def test_build_dataset_node_shows_progress_and_honours_cancel(tmp_path, tiny_model_dir, comfy_root, pack,
                                                              monkeypatch):
    nodes = importlib.import_module(f"{pack.__name__}.nodes.dataset_nodes")
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    model_files = importlib.import_module(f"{pack.__name__}.trainer.model_files")
    spec = inference.Flux2ModelSpec(folder=model_files.inspect_model_folder(tiny_model_dir), precision="fp32")
    for n in range(3):
        noise_png(comfy_root / "input" / "set" / f"{n}.png", (64, 64), seed=n, caption=f"caption {n}")
    bars: list[tuple[str, int, list[int]]] = []

    class Bar:
        def __init__(self, total: int, *, label: str = "") -> None:
            bars.append((label, total, []))

        def update_absolute(self, value: int) -> None:
            bars[-1][2].append(value)

    monkeypatch.setattr(bridge, "Progress", Bar)
    checks = {"n": 0}

    def cancel_at_the_latents(limit: int | None):
        def check() -> None:
            checks["n"] += 1
            if limit is not None and checks["n"] > limit:
                raise Cancelled
        return check

    widgets = dict(resolution=64, repeats=1, caption_strategy="textfile", vae_batch_size=1)
    monkeypatch.setattr(bridge, "check_interrupted", cancel_at_the_latents(6 + 2))  # 6 scanned files, 2 latents
    with pytest.raises(Cancelled):
        nodes.Flux2BuildDataset().build(spec, "set", **widgets)
    assert bars == [("Build Dataset: latents", 3, [0, 1])]
    bars.clear()
    monkeypatch.setattr(bridge, "check_interrupted", cancel_at_the_latents(None))
    handle, count, report, _ = nodes.Flux2BuildDataset().build(spec, "set", **widgets)["result"]
    assert count == 3 and "latents: 1 encoded, 2 reused" in report
    assert bars == [("Build Dataset: latents", 1, [0, 1]), ("Build Dataset: captions", 4, [0, 4])]


def test_text_encoder_batch_and_write_batch_are_separate(tmp_path, model, monkeypatch):
    """SimpleTuner's text_embeds keys: text_encoder_batch_size captions per encoder call, write_batch_size
    embeddings per round of writes (a Cancel writes the round still pending)."""
    from flux2_lora_pack.trainer import cache_fill, flux2
    from flux2_lora_pack.trainer.build import build_datasets
    from flux2_lora_pack.trainer.databackend import load_backend_config

    folder = _folder(tmp_path)
    calls: list[int] = []
    encode = flux2.encode_prompts
    monkeypatch.setattr(flux2, "encode_prompts", lambda enc, tok, prompts, **kw: calls.append(len(prompts)) or
                        encode(enc, tok, prompts, **kw))
    groups: list[int] = []
    flush = cache_fill.CacheWriter.flush

    def recording_flush(self):
        pending = len(self.pending)
        flush(self)
        groups.append(pending)

    monkeypatch.setattr(cache_fill.CacheWriter, "flush", recording_flush)
    config_path = tmp_path / "multidatabackend.json"
    config_path.write_text(json.dumps([
        {"id": "imgs", "instance_data_dir": str(folder), "resolution": 64},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "text"),
         "text_encoder_batch_size": 2, "write_batch_size": 4}]))
    config = load_backend_config(config_path)
    assert [(t.encoder_batch_size, t.write_batch_size) for t in config.text_embeds] == [(2, 4)]

    def cancel_at_the_last(name: str, done: int, total: int) -> None:
        if name == "captions" and done == 6:
            raise Cancelled

    with pytest.raises(Cancelled):
        build_datasets(config, model=model, out_dir=tmp_path / "out", text_precision="fp32", progress=cancel_at_the_last)
    assert calls == [2, 2, 2]  # 6 captions ("" included), 2 per encoder call; cancelled after the last call
    assert [g for g in groups if g] == [4, 2]  # a round of 4, then the 2 pending when the build stopped
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 6
    calls.clear()
    build_datasets(config, model=model, out_dir=tmp_path / "out", text_precision="fp32")
    assert calls == []  # every embedding was kept
