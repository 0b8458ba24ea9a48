"""The dataset preview (Build Dataset's IMAGE output): tiles per bucket are exactly the trained crops, the bucket
table counts what the manifest trains, and every skipped file appears with its reason."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from image_tools import noise_png
from PIL import Image

from flux2_lora_pack.trainer.buckets import CropPlan
from flux2_lora_pack.trainer.build import build_dataset, build_datasets
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.databackend import load_backend_config
from flux2_lora_pack.trainer.dataset_preview import render_dataset_preview
from flux2_lora_pack.trainer.manifest import load_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.scan import load_training_image

LONG = "a square of noise " + " ".join(f"word{i}" for i in range(200))


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory) -> Path:
    """8 usable images in 3 buckets at resolution 64 (5 square, 2 wide, 1 tall), repeats 2, and 3 skipped files."""
    images = tmp_path_factory.mktemp("preview") / "images"
    for n in range(5):
        noise_png(images / f"sq{n}.png", (64, 64), seed=n, caption=LONG if n == 1 else f"square {n}")
    for n in range(2):
        noise_png(images / f"w{n}.png", (96, 64), seed=10 + n, caption=f"wide {n}")
    noise_png(images / "t0.png", (64, 112), seed=20, caption="tall\nsecond phrasing")
    (images / "empty.png").write_bytes(b"")
    noise_png(images / "nocap.png", (64, 64), seed=30)
    (images / "broken.png").write_bytes(b"not a png at all")
    return build_dataset(image_dir=images, model=inspect_model_folder(tiny_model_dir),
                         out_dir=images.parent / "built", resolution=64, repeats=2, text_precision="fp32")


def _trained_uint8(manifest_path: Path, index: int) -> np.ndarray:
    """load_training_image's output for manifest item index (geometry read from the manifest file), as 0..255."""
    data = json.loads(manifest_path.read_text())
    item = data["items"][index]
    plan = CropPlan(bucket=tuple(item["bucket"]), resized=tuple(item["resized"]), crop=tuple(item["crop"]), scale=1.0)
    [source] = [s for s in data["sources"] if s["id"] == item["source"]]
    pixels = load_training_image(Path(source["image_dir"]) / item["image"], plan=plan)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _tile(preview, tile) -> np.ndarray:
    return np.asarray(preview.image.crop(tile.box))


def test_tiles_are_the_trained_crops_up_to_n_per_bucket(built):
    manifest = load_manifest(built)
    preview = render_dataset_preview(manifest, load_build_report(built.parent), per_bucket=3)
    assert Counter(t.bucket for t in preview.tiles) == {(64, 64): 3, (80, 48): 2, (48, 80): 1}
    square = [i for i, it in enumerate(manifest.items) if it.bucket == (64, 64)]
    # Spread over the bucket: its first, middle and last image.
    assert [t.index for t in preview.tiles if t.bucket == (64, 64)] == [square[0], square[2], square[4]]
    boxes = [t.box for t in preview.tiles]
    for tile in preview.tiles:
        assert tile.problem is None
        assert tile.caption == manifest.items[tile.index].caption
        left, top, right, bottom = tile.box
        assert (right - left, bottom - top) == tile.bucket  # pixel for pixel: every bucket is under 256 px
        assert 0 <= left and right <= preview.image.width and 0 <= top and bottom <= preview.image.height
        np.testing.assert_array_equal(_tile(preview, tile), _trained_uint8(built, tile.index))
        others = [b for b in boxes if b != tile.box]
        assert not any(b[0] < right and left < b[2] and b[1] < bottom and top < b[3] for b in others)
    assert preview.scale == {(48, 80): 1.0, (64, 64): 1.0, (80, 48): 1.0}
    # The tall image is cropped: its trained tile is not the whole image squeezed.
    tall = next(t for t in preview.tiles if t.bucket == (48, 80))
    assert manifest.items[tall.index].resized[1] > 80


def test_every_image_of_a_bucket_and_the_image_output(built):
    manifest = load_manifest(built)
    preview = render_dataset_preview(manifest, load_build_report(built.parent), per_bucket=32)
    assert sorted(t.index for t in preview.tiles) == list(range(len(manifest.items)))
    image = preview.to_tensor()
    assert image.shape == (1, preview.image.height, preview.image.width, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    tile = preview.tiles[0]
    left, top, right, bottom = tile.box
    torch.testing.assert_close(image[0, top:bottom, left:right],
                               torch.from_numpy(_trained_uint8(built, tile.index)).float() / 255, rtol=0, atol=0)


def test_large_buckets_are_scaled_down_for_display_only(built):
    manifest = load_manifest(built)
    preview = render_dataset_preview(manifest, load_build_report(built.parent), per_bucket=1, tile_size=32)
    assert preview.scale == {(48, 80): 0.4, (64, 64): 0.5, (80, 48): 0.4}
    sizes = {t.bucket: (t.box[2] - t.box[0], t.box[3] - t.box[1]) for t in preview.tiles}
    assert sizes == {(48, 80): (19, 32), (64, 64): (32, 32), (80, 48): (32, 19)}
    for tile in preview.tiles:
        shrunk = Image.fromarray(_trained_uint8(built, tile.index)).resize(sizes[tile.bucket],
                                                                           resample=Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(_tile(preview, tile), np.asarray(shrunk))


def test_bucket_table_and_skipped_files_with_reasons(built):
    manifest = load_manifest(built)
    report = load_build_report(built.parent)
    preview = render_dataset_preview(manifest, report, per_bucket=2)
    assert [(r.bucket, r.images, r.samples_per_epoch, r.shown) for r in preview.buckets] == [
        ((48, 80), 1, 2, 1), ((64, 64), 5, 10, 2), ((80, 48), 2, 4, 2)]
    reasons = {s.path: s.reason for s in preview.skipped}
    assert set(reasons) == {"empty.png", "nocap.png", "broken.png"}
    assert reasons["empty.png"] == "zero-byte file"
    assert reasons["nocap.png"].startswith("missing caption")
    assert reasons["broken.png"].startswith("not an image Pillow can read")
    assert {s.dataset for s in preview.skipped} == set(report.datasets)

    tables_only = render_dataset_preview(manifest, report, per_bucket=0)
    assert tables_only.tiles == () and [r.shown for r in tables_only.buckets] == [0, 0, 0]
    assert tables_only.skipped == preview.skipped
    assert tables_only.image.height < preview.image.height

    without_report = render_dataset_preview(manifest, None, per_bucket=2)
    assert without_report.skipped == () and without_report.image.height < preview.image.height


def test_a_long_caption_stays_inside_its_tile_column(built):
    manifest = load_manifest(built)
    preview = render_dataset_preview(manifest, load_build_report(built.parent), per_bucket=5)
    long_tile = next(t for t in preview.tiles if t.caption == LONG)
    neighbour = next(t for t in preview.tiles if t.bucket == long_tile.bucket and t.box[0] > long_tile.box[0])
    sheet = np.asarray(preview.image).astype(int)
    background = np.array([32, 32, 32])
    # The caption is drawn under the tile, and the gap before the next column stays empty.
    under = sheet[long_tile.box[3]:long_tile.box[3] + 60, long_tile.box[0]:long_tile.box[0] + 150]
    assert (np.abs(under - background).sum(-1) > 60).sum() > 100
    gap = sheet[long_tile.box[3]:long_tile.box[3] + 80, neighbour.box[0] - 8:neighbour.box[0] - 1]
    assert (gap == background).all()


def test_a_changed_or_missing_image_is_flagged_not_shown(built, tmp_path):
    manifest = load_manifest(built)
    copy = tmp_path / "images"
    shutil.copytree(manifest.sources["default"].image_dir, copy)
    moved = dataclasses.replace(manifest, sources={"default": dataclasses.replace(manifest.sources["default"],
                                                                                  image_dir=copy)})
    square = [i for i, it in enumerate(manifest.items) if it.bucket == (64, 64)]
    noise_png(copy / manifest.items[square[0]].image, (64, 64), seed=99)  # other pixels than the cached latent's
    (copy / manifest.items[square[-1]].image).unlink()
    preview = render_dataset_preview(moved, None, per_bucket=5)
    problems = {t.index: t.problem for t in preview.tiles if t.problem}
    assert set(problems) == {square[0], square[-1]}
    assert "changed since the build" in problems[square[0]]
    assert problems[square[-1]].startswith("cannot read")
    assert all(t.problem is None for t in preview.tiles if t.index not in problems)
    with pytest.raises(ValueError, match="per_bucket must be >= 0"):
        render_dataset_preview(manifest, None, per_bucket=-1)


def test_several_datasets_and_edit_references(tiny_model_dir, tmp_path):
    """A multidatabackend build: tiles of both image datasets (the edit targets, whose references train beside
    them), and the skipped file named with its dataset."""
    noise_png(tmp_path / "edits" / "e1.png", (64, 64), seed=1, caption="make it red")
    noise_png(tmp_path / "edits" / "e2.png", (96, 64), seed=2, caption="make it blue")
    noise_png(tmp_path / "refs" / "e1.png", (64, 64), seed=11)
    noise_png(tmp_path / "refs" / "e2.png", (96, 64), seed=12)
    noise_png(tmp_path / "styles" / "s1.png", (64, 64), seed=31, caption="a style")
    noise_png(tmp_path / "styles" / "tiny.png", (32, 32), seed=33, caption="too small")
    config = tmp_path / "multidatabackend.json"
    config.write_text(json.dumps([
        {"id": "edits", "instance_data_dir": str(tmp_path / "edits"), "resolution": 64, "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": str(tmp_path / "refs"), "resolution": 64},
        {"id": "styles", "instance_data_dir": str(tmp_path / "styles"), "resolution": 64, "minimum_image_size": 48},
    ]))
    built = build_datasets(load_backend_config(config), model=inspect_model_folder(tiny_model_dir),
                           out_dir=tmp_path / "built", text_precision="fp32")
    manifest = load_manifest(built)
    preview = render_dataset_preview(manifest, load_build_report(built.parent), per_bucket=4)
    assert sorted((manifest.items[t.index].source, manifest.items[t.index].image) for t in preview.tiles) == [
        ("edits", "e1.png"), ("edits", "e2.png"), ("styles", "s1.png")]
    assert [len(manifest.items[t.index].references) for t in preview.tiles if t.caption.startswith("make")] == [1, 1]
    for tile in preview.tiles:
        np.testing.assert_array_equal(_tile(preview, tile), _trained_uint8(built, tile.index))
    [skipped] = preview.skipped
    assert (skipped.dataset, skipped.path) == ("styles", "tiny.png") and skipped.reason.startswith("too small")
    assert [(r.bucket, r.images) for r in preview.buckets] == [((64, 64), 2), ((80, 48), 1)]
