"""Several datasets in one run: merged manifests, their refusals, the config key and the run summary.

Two small datasets are built on the tiny model (one plain, one with a reference dataset) and merged. The
merged manifest must point at the very cache files of its parts: latents are compared with torch.equal.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer.build import build_dataset, build_datasets
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.config import TrainConfig
from flux2_lora_pack.trainer.databackend import load_backend_config
from flux2_lora_pack.trainer.manifest import load_batch, load_manifest, load_text_embedding
from flux2_lora_pack.trainer.merge import RUN_REPORT_FILE, RUN_SUMMARY_FILE, merge_manifests, resolve_training_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.sampler import BucketBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return inspect_model_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, model) -> tuple[Path, Path]:
    """A plain dataset of 3 squares (repeats 2) and an edit dataset of 2 wide images with strict references."""
    root = tmp_path_factory.mktemp("merge")
    for n in range(3):
        noise_png(root / "plain" / f"p{n}.png", (64, 64), seed=n, caption=f"plain {n}")
    plain = build_dataset(image_dir=root / "plain", model=model, out_dir=root / "plain_built", resolution=64,
                          repeats=2, text_precision="fp32", extra_prompts=["a validation prompt"])
    for n in range(2):
        noise_png(root / "edits" / f"e{n}.png", (96, 64), seed=10 + n, caption=f"edit {n}")
        noise_png(root / "refs" / f"e{n}.png", (96, 64), seed=20 + n)
    (root / "edit.json").write_text(json.dumps([
        # "default" is also the plain dataset's id: the merge must rename one of them.
        {"id": "default", "instance_data_dir": "edits", "resolution": 64, "conditioning_data": ["refs"]},
        {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "refs", "resolution": 64},
        {"id": "text", "dataset_type": "text_embeds", "default": True},
    ]), encoding="utf-8")
    edit = build_datasets(load_backend_config(root / "edit.json"), model=model, out_dir=root / "edit_built",
                          text_precision="fp32")
    return plain, edit


def test_merged_manifest_points_at_the_parts_caches(two_datasets, tmp_path):
    plain_path, edit_path = two_datasets
    merged = load_manifest(merge_manifests([plain_path, edit_path], out_dir=tmp_path / "merged"))
    plain, edit = load_manifest(plain_path), load_manifest(edit_path)

    assert set(merged.sources) == {"default", "default-2", "refs"}
    assert merged.sources["default-2"].conditioning_data == ("refs",)
    assert [(it.source, it.image, it.repeats) for it in merged.items] == [
        ("default", "p0.png", 2), ("default", "p1.png", 2), ("default", "p2.png", 2),
        ("default-2", "e0.png", 1), ("default-2", "e1.png", 1)]
    assert [r.source for it in merged.items for r in it.references] == ["refs", "refs"]
    # Every cache path is absolute and is the part's own file: nothing was copied.
    parts = [(plain, i) for i in range(3)] + [(edit, i) for i in range(2)]
    for n, (part, i) in enumerate(parts):
        assert Path(merged.items[n].latent).is_absolute()
        assert merged.latent_path(n) == part.latent_path(i)
        assert merged.image_path(n) == part.image_path(i)
    assert merged.reference_latent_path(3, 0) == edit.reference_latent_path(0, 0)
    assert not list((tmp_path / "merged").glob("**/*.safetensors"))
    # Batches load the same tensors as from the parts.
    for n, (part, i) in enumerate(parts):
        mine, theirs = load_batch(merged, [n], verify=True), load_batch(part, [i], verify=True)
        assert torch.equal(mine.latents, theirs.latents) and torch.equal(mine.prompt_embeds, theirs.prompt_embeds)
        assert len(mine.reference_latents) == len(theirs.reference_latents)
        for a, b in zip(mine.reference_latents, theirs.reference_latents):
            assert torch.equal(a, b)
    # Captions of both parts, the empty caption and the validation prompt are all in the text cache.
    assert {"", "a validation prompt", "plain 0", "plain 2", "edit 1"} <= set(merged.text_cache)
    assert torch.equal(load_text_embedding(merged, "a validation prompt"),
                       load_text_embedding(plain, "a validation prompt"))
    # The identity of a merge is its parts in order.
    assert merged.fingerprint not in (plain.fingerprint, edit.fingerprint)
    swapped = load_manifest(merge_manifests([edit_path, plain_path], out_dir=tmp_path / "swapped"))
    assert swapped.fingerprint != merged.fingerprint
    again = load_manifest(merge_manifests([plain_path, edit_path], out_dir=tmp_path / "again"))
    assert again.fingerprint == merged.fingerprint


def test_merged_epoch_keeps_datasets_apart_and_covers_every_copy(two_datasets, tmp_path):
    merged = load_manifest(merge_manifests(list(two_datasets), out_dir=tmp_path / "m"))
    ranks = [BucketBatchSampler(merged, batch_size=1, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        plan = ranks[0].epoch_plan(epoch)
        for batch in plan:
            assert len({merged.items[i].source for i in batch}) == 1  # one dataset per batch
        counts = Counter(i for b in plan for i in b)
        # 3 squares x 2 copies = 6 (3 global batches of 2); 2 edits x 1 = 2 (1 global batch).
        assert counts == {0: 2, 1: 2, 2: 2, 3: 1, 4: 1}
        per_rank = [s.rank_batches(epoch) for s in ranks]
        assert [a + b for a, b in zip(*per_rank)] == plan  # disjoint shards of each global batch


def test_merged_report_and_run_summary(two_datasets, tmp_path):
    barriers = []
    manifest = resolve_training_manifest(
        dataset_manifests=list(two_datasets), data_backend_config=None, model=None, out_dir=tmp_path / "run",
        is_main=True, barrier=lambda: barriers.append(1))
    assert barriers == [1] and manifest.path == (tmp_path / "run" / "dataset" / "manifest.json").resolve()
    report = load_build_report(manifest.root)
    plain, edit = (load_build_report(Path(p).parent) for p in two_datasets)
    assert report.usable_images == plain.usable_images + edit.usable_images == 5
    assert set(report.datasets) == {"default", "default-2", "refs"}
    assert report.vae_images_encoded == plain.vae_images_encoded + edit.vae_images_encoded
    assert report.buckets == {"64x64": 3, "80x48": 2}
    summary = (tmp_path / "run" / RUN_SUMMARY_FILE).read_text(encoding="utf-8")
    assert "5 usable images in 2 buckets" in summary and "dataset default-2 (image)" in summary
    record = json.loads((tmp_path / "run" / RUN_REPORT_FILE).read_text(encoding="utf-8"))
    assert record["fingerprint"] == manifest.fingerprint and record["usable_images"] == 5
    # Other ranks only wait and read.
    other = resolve_training_manifest(
        dataset_manifests=list(two_datasets), data_backend_config=None, model=None, out_dir=tmp_path / "run",
        is_main=False, barrier=lambda: barriers.append(2))
    assert barriers == [1, 2] and other.fingerprint == manifest.fingerprint


def test_merge_refusals(two_datasets, tmp_path):
    plain_path, edit_path = two_datasets
    with pytest.raises(ValueError, match=r"dataset 2 and dataset 1 are the same dataset"):
        merge_manifests([plain_path, plain_path], out_dir=tmp_path / "same")
    # A copy of the plain dataset whose latents came from another VAE.
    other = tmp_path / "other"
    shutil.copytree(plain_path.parent, other)
    record = json.loads((other / "manifest.json").read_text(encoding="utf-8"))
    record["vae_identity"] = "another-vae"
    (other / "manifest.json").write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(ValueError, match=r"dataset 2 \(.*other.*\) was built with another VAE than dataset 1"):
        merge_manifests([edit_path, other / "manifest.json"], out_dir=tmp_path / "vae")
    with pytest.raises(ValueError, match=r"at least two manifests"):
        merge_manifests([plain_path], out_dir=tmp_path / "one")
    with pytest.raises(ValueError, match=r"exactly one of dataset_manifest and data_backend_config"):
        resolve_training_manifest(dataset_manifests=[plain_path], data_backend_config=tmp_path / "x.json",
                                  model=None, out_dir=tmp_path, is_main=True, barrier=lambda: None)
    assert not (tmp_path / "same").exists() and not (tmp_path / "vae").exists()


def test_config_takes_one_manifest_or_a_list(two_datasets, tiny_model_dir, tmp_path):
    plain_path, edit_path = two_datasets
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "out")}
    one = TrainConfig.from_dict(base | {"dataset_manifest": str(plain_path)})
    assert one.dataset_manifest == str(plain_path) and one.data.dataset_manifests == (plain_path,)
    both = TrainConfig.from_dict(base | {"dataset_manifest": [str(plain_path), str(edit_path)]})
    assert both.data.dataset_manifests == (plain_path, edit_path)
    path = tmp_path / "run.json"
    both.to_json(path)
    assert TrainConfig.from_json(path) == both
    assert json.loads(path.read_text())["dataset_manifest"] == [str(plain_path), str(edit_path)]
    for bad, match in [([], "non-empty list of paths"), ([str(plain_path), 3], "non-empty list of paths"),
                       ([str(plain_path), str(plain_path)], "lists a path twice"),
                       ([str(plain_path), str(tmp_path / "nope.json")], r"dataset_manifest .*nope.json' does not exist")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict(base | {"dataset_manifest": bad})
