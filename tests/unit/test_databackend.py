"""multidatabackend.json: parsing and its errors, SimpleTuner bucket geometry, multi-dataset builds with
conditioning (reference) datasets, reference-aware sampling, reference tokens and the loss mask.

Images are tiny synthetic PNGs; encoders are the session's tiny FLUX.2. Float checks: cached reference
latents against a fresh encode of the same crop, atol/rtol 1e-5 (same fp32 path, batch-size rounding only).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, model_files
from flux2_lora_pack.trainer.buckets import (
    choose_bucket,
    image_size_measure,
    plan_crop_styled,
    plan_matching_crop,
    target_area,
)
from flux2_lora_pack.trainer.build import build_datasets
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.databackend import load_backend_config, parse_backend_config
from flux2_lora_pack.trainer.manifest import load_batch, load_manifest
from flux2_lora_pack.trainer.merge import RUN_REPORT_FILE, RUN_SUMMARY_FILE, resolve_training_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.sampler import BucketBatchSampler
from flux2_lora_pack.trainer.scan import load_training_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402

# ------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("size", "kwargs", "bucket"),
    [
        ((1000, 1000), {"resolution": 1024}, (1024, 1024)),
        ((1500, 1000), {"resolution": 1024}, (1248, 832)),  # nearest 3:2 bucket of about 1024^2
        ((1000, 1500), {"resolution": 1024}, (832, 1248)),
        ((1500, 1000), {"resolution": 1024, "crop_aspect": "square"}, (1024, 1024)),
        ((1500, 1000), {"resolution": 1024, "crop_aspect": "preserve"}, (1248, 832)),
        ((1400, 1000), {"resolution": 1024, "crop_aspect": "preserve"}, (1216, 864)),  # own 1.4 aspect
        ((1400, 1000), {"resolution": 1024, "crop": False}, (1216, 864)),
        ((1500, 1000), {"resolution": 1.0, "resolution_type": "area"}, (1216, 816)),  # 1 MP
        ((1500, 1000), {"resolution": 512, "resolution_type": "pixel"}, (768, 512)),  # shorter side 512
        ((1000, 1500), {"resolution": 512, "resolution_type": "pixel"}, (512, 768)),
        ((1500, 1000), {"resolution": 512, "resolution_type": "pixel", "crop_aspect": "square"}, (512, 512)),
    ],
)
def test_buckets_follow_simpletuner_resolution_types_and_crop_aspects(size, kwargs, bucket):
    assert choose_bucket(*size, **kwargs) == bucket
    assert bucket[0] % 16 == 0 and bucket[1] % 16 == 0


def test_size_units_and_areas():
    assert target_area(1024, resolution_type="pixel_area") == 1024 * 1024
    assert target_area(1.05, resolution_type="area") == 1_050_000
    assert image_size_measure(2000, 500, resolution_type="pixel_area") == 1000.0
    assert image_size_measure(2000, 500, resolution_type="area") == 1.0
    assert image_size_measure(2000, 500, resolution_type="pixel") == 500.0


def test_crop_styles_and_strict_reference_crops():
    center = plan_crop_styled(96, 64, bucket=(64, 64), crop_style="center")
    corner = plan_crop_styled(96, 64, bucket=(64, 64), crop_style="corner")
    rand = plan_crop_styled(96, 64, bucket=(64, 64), crop_style="random", random_key="abc")
    assert (center.resized, center.crop, corner.crop) == ((96, 64), (16, 0), (0, 0))
    assert 0 <= rand.crop[0] <= 32 and rand.crop[1] == 0
    assert rand == plan_crop_styled(96, 64, bucket=(64, 64), crop_style="random", random_key="abc")  # fixed per image
    assert {plan_crop_styled(96, 64, bucket=(64, 64), crop_style="random", random_key=str(k)).crop for k in range(20)} != {rand.crop}
    # A strict reference of the same size gets exactly the edit image's crop; twice the size, the same region.
    assert plan_matching_crop(96, 64, like=corner) == corner
    double = plan_matching_crop(192, 128, like=center)
    assert (double.bucket, double.resized, double.crop) == ((64, 64), (96, 64), (16, 0))
    with pytest.raises(ValueError, match="crop_style 'face' is not one of center, random, corner"):
        plan_crop_styled(96, 64, bucket=(64, 64), crop_style="face")


# ------------------------------------------------------------------------------------------- parsing


def _write_config(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_parses_simpletuner_example_with_relative_paths(tmp_path):
    (tmp_path / "data" / "edits").mkdir(parents=True)
    (tmp_path / "data" / "refs").mkdir(parents=True)
    path = _write_config(tmp_path, [
        {"id": "edits", "type": "local", "instance_data_dir": "data/edits", "caption_strategy": "instanceprompt",
         "instance_prompt": "make it red", "crop": True, "crop_aspect": "closest", "crop_style": "center",
         "resolution": 512, "resolution_type": "pixel_area", "minimum_image_size": 256, "maximum_image_size": 4096,
         "repeats": 2, "cache_dir_vae": "cache/vae/edits", "metadata_backend": "discovery",
         "conditioning_data": "refs"},
        {"id": "refs", "type": "local", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "data/refs", "source_dataset_id": "edits"},
        {"id": "old", "type": "local", "instance_data_dir": "nowhere", "disabled": True},
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": "cache/text", "write_batch_size": 64},
    ])
    config = load_backend_config(path)
    (edits,) = config.datasets
    assert edits.instance_data_dir == tmp_path.resolve() / "data" / "edits"
    assert edits.cache_dir_vae == tmp_path.resolve() / "cache" / "vae" / "edits"
    assert (edits.copies, edits.conditioning_data, edits.resolution, edits.minimum_image_size) == (3, ("refs",), 512, 256)
    assert config.conditioning["refs"].conditioning_type == "reference_strict"
    assert config.disabled == ("old",)
    text = config.default_text_embeds()
    assert (text.id, text.cache_dir, text.write_batch_size) == ("text-embeds", tmp_path.resolve() / "cache" / "text", 64)
    assert json.loads(json.dumps(config.to_dict()))["datasets"][0]["id"] == "edits"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"crop_aspect": "wide"}, "dataset 'a': crop_aspect is 'wide'; choose one of square, preserve, closest"),
        ({"crop_style": "face"}, "dataset 'a': crop_style is 'face'; choose one of center, random, corner"),
        ({"resolution_type": "megapixel"}, "dataset 'a': resolution_type is 'megapixel'"),
        ({"caption_strategy": "parquet"}, "dataset 'a': caption_strategy is 'parquet'"),
        ({"caption_strategy": "instanceprompt"}, "dataset 'a': instance_prompt is required with caption_strategy instanceprompt"),
        ({"resolution": "big"}, "dataset 'a': resolution is 'big', not a number"),
        ({"resolution": 1024, "resolution_type": "area"}, "1024 megapixels with resolution_type area"),
        ({"repeats": -1}, "dataset 'a': repeats is -1; it must be >= 0"),
        ({"repeats": 1.5}, "dataset 'a': repeats is 1.5; it must be a whole number"),
        ({"crop": "yes"}, "dataset 'a': crop is 'yes'; use true or false"),
        ({"minimum_image_size": 900, "maximum_image_size": 800}, "minimum_image_size 900 is above maximum_image_size 800"),
        ({"metadata_backend": "parquet"}, "metadata_backend is 'parquet'; only 'discovery'"),
        ({"type": "aws"}, "dataset 'a': type is 'aws'; only 'local'"),
        ({"instance_data_dir": "missing"}, "dataset 'a': instance_data_dir"),
        ({"resolutoin": 512}, "dataset 'a': resolutoin is not a key of a image dataset .*Did you mean 'resolution'"),
        ({"max_upscale_threshold": 0.2}, "dataset 'a': max_upscale_threshold is a SimpleTuner option this trainer does not implement"),
        ({"target_downsample_size": 0}, "dataset 'a': target_downsample_size is 0"),
        ({"conditioning_data": ["nope"]}, "dataset 'a': conditioning_data names 'nope', which is not a conditioning dataset"),
        ({"dataset_type": "video"}, "dataset 'a': dataset_type is 'video'"),
        ({"conditioning_multidataset_sampling": "mixed"}, "conditioning_multidataset_sampling is 'mixed'"),
    ],
)
def test_bad_entries_name_the_dataset_and_key(tmp_path, entry, message):
    (tmp_path / "imgs").mkdir()
    raw = {"id": "a", "type": "local", "instance_data_dir": "imgs"} | entry
    with pytest.raises(ValueError, match=message):
        parse_backend_config([raw], base_dir=tmp_path)


def test_whole_file_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    ok = {"id": "a", "instance_data_dir": "imgs"}
    with pytest.raises(ValueError, match="must be a non-empty JSON list"):
        parse_backend_config({"id": "a"}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset 'a': id is used twice"):
        parse_backend_config([ok, ok], base_dir=tmp_path)
    with pytest.raises(ValueError, match="entry 0 has no id"):
        parse_backend_config([{"instance_data_dir": "imgs"}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="has no enabled image dataset"):
        parse_backend_config([ok | {"disabled": True}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="conditioning_type is required"):
        parse_backend_config([ok, {"id": "c", "dataset_type": "conditioning", "instance_data_dir": "imgs"}],
                             base_dir=tmp_path)
    with pytest.raises(ValueError, match="names 'c', which is disabled"):
        parse_backend_config([ok | {"conditioning_data": ["c"]},
                              {"id": "c", "dataset_type": "conditioning", "conditioning_type": "reference_loose",
                               "instance_data_dir": "imgs", "disabled": True}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset 't': write_batch_size is 0; it must be >= 1"):
        parse_backend_config([ok, {"id": "t", "dataset_type": "text_embeds", "write_batch_size": 0}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="none has default true"):
        parse_backend_config([ok, {"id": "t", "dataset_type": "text_embeds"}, {"id": "u", "dataset_type": "text_embeds"}],
                             base_dir=tmp_path)
    path = tmp_path / "bad.json"
    path.write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_backend_config(path)


# ------------------------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return inspect_model_folder(tiny_model_dir)


def _edit_project(root: Path) -> Path:
    """Two image datasets (one of edits with strict and loose references) and a text_embeds cache."""
    noise_png(root / "edits" / "e1.png", (64, 64), seed=1, caption="make it red")
    noise_png(root / "edits" / "e2.png", (96, 64), seed=2, caption="make it blue")
    noise_png(root / "edits" / "sub" / "e3.png", (64, 64), seed=3, caption="make it red")
    noise_png(root / "strict" / "e1.jpg", (128, 128), seed=11)  # same scene at twice the size, another format
    noise_png(root / "strict" / "e2.png", (96, 64), seed=12)
    noise_png(root / "strict" / "sub" / "e3.png", (64, 64), seed=13)
    noise_png(root / "loose" / "e1.png", (64, 96), seed=21)
    noise_png(root / "loose" / "e2.png", (64, 64), seed=22)
    noise_png(root / "loose" / "sub" / "e3.png", (64, 96), seed=23)
    noise_png(root / "styles" / "s1.png", (64, 64), seed=31, caption="a style")
    noise_png(root / "styles" / "s2.png", (64, 64), seed=32, caption="a style")
    (root / "styles" / "tiny.png").parent.mkdir(exist_ok=True)
    noise_png(root / "styles" / "tiny.png", (32, 32), seed=33, caption="too small")
    return _write_config(root, [
        {"id": "edits", "instance_data_dir": "edits", "resolution": 64, "repeats": 1,
         "conditioning_data": ["strict", "loose"], "conditioning_multidataset_sampling": "combined"},
        {"id": "strict", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "strict", "resolution": 64, "cache_dir_vae": "cache/strict"},
        {"id": "loose", "dataset_type": "conditioning", "conditioning_type": "reference_loose",
         "instance_data_dir": "loose", "resolution": 64},
        {"id": "styles", "instance_data_dir": "styles", "resolution": 64, "minimum_image_size": 48,
         "caption_strategy": "textfile"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text", "write_batch_size": 2},
    ])


@pytest.fixture(scope="module")
def edit_build(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("edits")
    config = load_backend_config(_edit_project(root))
    manifest = build_datasets(config, model=model, out_dir=root / "built", text_precision="fp32")
    return root, config, manifest


def test_multi_dataset_build_pairs_references_and_reports(edit_build, model):
    root, config, manifest_path = edit_build
    manifest = load_manifest(manifest_path)
    report = load_build_report(manifest_path.parent)
    rows = [(it.source, it.image, it.bucket, it.repeats, [(r.source, r.image, r.bucket, r.crop) for r in it.references])
            for it in manifest.items]
    assert rows == [
        ("edits", "e1.png", (64, 64), 2, [("strict", "e1.jpg", (64, 64), (0, 0)), ("loose", "e1.png", (48, 80), (2, 0))]),
        ("edits", "e2.png", (80, 48), 2, [("strict", "e2.png", (80, 48), (0, 2)), ("loose", "e2.png", (64, 64), (0, 0))]),
        ("edits", "sub/e3.png", (64, 64), 2, [("strict", "sub/e3.png", (64, 64), (0, 0)),
                                             ("loose", "sub/e3.png", (48, 80), (2, 0))]),
        ("styles", "s1.png", (64, 64), 1, []),
        ("styles", "s2.png", (64, 64), 1, []),
    ]
    # Strict references live in their own cache_dir_vae, stored as absolute paths outside the dataset folder.
    assert Path(manifest.items[0].references[0].latent).parent == root.resolve() / "cache" / "strict"
    assert all(Path(manifest.items[0].text).parent == root.resolve() / "cache" / "text" for _ in [0])
    assert set(report.datasets) == {"strict", "loose", "edits", "styles"}
    styles = report.datasets["styles"]
    assert (styles["found"], styles["used"], styles["buckets"]) == (3, 2, {"64x64": 2})
    assert styles["skipped"] == [{"path": str(root.resolve() / "styles" / "tiny.png"),
                                  "reason": "too small: 32x32 is 32 sqrt(w*h) px, under minimum_image_size 48"}]
    assert styles["caption_words"] == {"min": 2, "mean": 2.0, "max": 2, "empty": 0}
    assert (report.datasets["edits"]["used"], report.datasets["loose"]["buckets"]) == (3, {"48x80": 2, "64x64": 1})
    assert report.datasets["strict"]["latent_bytes_per_image"] == pytest.approx(
        np.mean([Path(it.references[0].latent).stat().st_size for it in manifest.items[:3]]))
    assert (report.vae_images_encoded, report.prompts_encoded) == (11, 4)  # 5 targets + 6 refs; 3 captions + ""
    summary = report.summary()
    assert "dataset styles (image): 3 found, 2 used, 1 skipped; x1 per epoch; buckets 64x64: 2" in summary
    assert "cache hit rate 0%" in summary

    # The strict reference of e1 is the same region of a 2x image: equal to encoding that crop directly.
    vae = model_files.load_vae(model, precision="fp32")
    ref = manifest.items[0].references[0]
    plan = plan_matching_crop(ref.width, ref.height, like=plan_crop_styled(64, 64, bucket=(64, 64)))
    pixels = load_training_image(root / "strict" / "e1.jpg", plan=plan)
    cached = load_batch(manifest, [0]).reference_latents[0]
    assert_close(cached, flux2.encode_images(vae, pixels[None]), atol=1e-5, rtol=1e-5)


def test_second_multi_build_uses_no_encoder(edit_build, model, monkeypatch):
    root, config, manifest_path = edit_build

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although everything is cached")

    monkeypatch.setattr(model_files, "load_vae", refuse)
    monkeypatch.setattr(model_files, "load_text_encoder", refuse)
    again = build_datasets(config, model=model, out_dir=manifest_path.parent, text_precision="fp32")
    report = load_build_report(again.parent)
    assert (report.vae_images_encoded, report.prompts_encoded, report.latents_reused, report.prompts_reused) == (0, 0, 11, 4)
    assert report.cache_hit_rate == 1.0
    assert load_manifest(again).fingerprint == load_manifest(manifest_path).fingerprint


def test_reference_batches_share_shapes_and_shard_across_ranks(edit_build):
    _, _, manifest_path = edit_build
    manifest = load_manifest(manifest_path)
    ranks = [BucketBatchSampler(manifest, batch_size=1, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        plan = ranks[0].epoch_plan(epoch)
        per_rank = [s.rank_batches(epoch) for s in ranks]
        assert [a + b for a, b in zip(*per_rank)] == plan
        for batch in plan:
            groups = {(manifest.items[i].source, manifest.items[i].bucket,
                       tuple(r.bucket for r in manifest.items[i].references)) for i in batch}
            assert len(groups) == 1  # one dataset, one target bucket, one reference shape per k
        # Each image's copies appear; padding only fills the last global batch of a group (e1 and e3 share one).
        counts = Counter(i for b in plan for i in b)
        assert {i for i in counts} == set(range(5)) and counts[1] == 2 and counts[3] + counts[4] == 2
    it = ranks[0].iter_batches()
    for _ in range(len(ranks[0])):
        ref = next(it)
        batch = load_batch(manifest, ref.indices, references=ref.references or None)
        n = len(manifest.items[ref.indices[0]].references)
        assert len(batch.reference_latents) == n
        for k, latent in enumerate(batch.reference_latents):
            w, h = manifest.items[ref.indices[0]].references[k].bucket
            assert latent.shape == (1, 128, h // 16, w // 16)


def test_random_conditioning_sampling_picks_one_reference_per_sample(edit_build):
    import dataclasses

    _, _, manifest_path = edit_build
    manifest = load_manifest(manifest_path)
    sources = dict(manifest.sources)
    sources["edits"] = dataclasses.replace(sources["edits"], conditioning_multidataset_sampling="random")
    manifest = dataclasses.replace(manifest, sources=sources)
    sampler = BucketBatchSampler(manifest, batch_size=1, seed=9)
    it = sampler.iter_batches()
    chosen = Counter()
    for _ in range(4 * len(sampler)):
        ref = next(it)
        item = manifest.items[ref.indices[0]]
        if item.references:
            assert len(ref.references) == 1 and len(ref.references[0]) == 1
            chosen[ref.references[0][0]] += 1
            batch = load_batch(manifest, ref.indices, references=ref.references)
            assert len(batch.reference_latents) == 1
        else:
            assert ref.references == ()
    assert set(chosen) == {0, 1}  # both conditioning datasets get used


def test_reference_tokens_get_time_ids_and_no_loss(edit_build):
    """Reference k's tokens carry t = 10 + 10k and are cut before the loss (objective.prepare_batch)."""
    from flux2_lora_pack.trainer.config import ObjectiveConfig
    from flux2_lora_pack.trainer.objective import (
        flow_matching_loss,
        prepare_batch,
        sample_generators,
    )

    _, _, manifest_path = edit_build
    manifest = load_manifest(manifest_path)
    batch = load_batch(manifest, [1])  # e2: target 80x48 (5x3 tokens), refs 80x48 and 64x64
    prepared = prepare_batch(latents=batch.latents, prompt_embeds=batch.prompt_embeds, empty_embeds=None,
                             spec=ObjectiveConfig(), generators=sample_generators(seed=0, step=0, first_index=0, count=1),
                             reference_latents=batch.reference_latents)
    assert prepared.num_target_tokens == 15 and prepared.hidden_states.shape == (1, 15 + 15 + 16, 128)
    ids = prepared.img_ids[0]
    assert Counter(ids[:, 0].tolist()) == {0: 15, 10: 15, 20: 16}
    assert_close(prepared.hidden_states[0, 15:30], flux2.pack_latents(batch.reference_latents[0])[0])
    assert prepared.target.shape == (1, 15, 128)

    class Echo(torch.nn.Module):  # predicts its input: the loss sees only the first num_target_tokens outputs
        def forward(self, *, hidden_states, **kwargs):
            return (hidden_states * 1.0,)

    loss = flow_matching_loss(Echo(), prepared, device=torch.device("cpu"), dtype=torch.float32)
    expected = torch.nn.functional.mse_loss(prepared.hidden_states[:, :15], prepared.target)
    assert_close(loss, expected)


def test_strict_missing_reference_is_an_error_loose_is_a_skip(tmp_path, model):
    noise_png(tmp_path / "edits" / "a.png", (64, 64), seed=1, caption="x")
    noise_png(tmp_path / "edits" / "b.png", (64, 64), seed=2, caption="y")
    noise_png(tmp_path / "refs" / "a.png", (64, 64), seed=3)
    noise_png(tmp_path / "refs" / "c.png", (64, 64), seed=4)
    entries = [{"id": "edits", "instance_data_dir": "edits", "resolution": 64, "conditioning_data": ["refs"]},
               {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
                "instance_data_dir": "refs", "resolution": 64}]
    config = load_backend_config(_write_config(tmp_path, entries))
    message = ("dataset 'edits' conditioning_data: reference_strict needs a reference for every image, matched by "
               f"relative path without extension; refs ({(tmp_path / 'refs').resolve()}) lacks 1: b.*")
    with pytest.raises(ValueError, match=re.escape(message)):
        build_datasets(config, model=model, out_dir=tmp_path / "out", text_precision="fp32")
    entries[1]["conditioning_type"] = "reference_loose"
    config = load_backend_config(_write_config(tmp_path, entries))
    manifest = load_manifest(build_datasets(config, model=model, out_dir=tmp_path / "out",
                                            text_precision="fp32"))
    assert [it.image for it in manifest.items] == ["a.png"]
    report = load_build_report(tmp_path / "out")
    assert report.datasets["edits"]["skipped"] == [{
        "path": str((tmp_path / "edits" / "b.png").resolve()),
        "reason": "unmatched reference: conditioning dataset 'refs' has no usable b.* (no such file)"}]


def test_bad_dataset_folders_and_cache_dirs(tmp_path, model):
    (tmp_path / "empty").mkdir()
    config = load_backend_config(_write_config(tmp_path, [{"id": "e", "instance_data_dir": "empty"}]))
    with pytest.raises(ValueError, match=r"dataset 'e' \(instance_data_dir\): image folder .* has no usable images"):
        build_datasets(config, model=model, out_dir=tmp_path / "out")
    noise_png(tmp_path / "imgs" / "a.png", (64, 64), seed=1, caption="x")
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    config = load_backend_config(_write_config(tmp_path, [
        {"id": "i", "instance_data_dir": "imgs", "cache_dir_vae": str(blocker / "vae")}]))
    with pytest.raises(ValueError, match=re.escape(f"dataset 'i' cache_dir_vae {blocker / 'vae'} is not a writable folder")):
        build_datasets(config, model=model, out_dir=tmp_path / "out")


def test_cli_builds_a_multidatabackend_config(edit_build, tiny_model_dir, capsys):
    from flux2_lora_pack.trainer.__main__ import main

    root, config, manifest_path = edit_build
    out = manifest_path.parent
    rc = main(["build-dataset", "--config", str(config.path), "--model", str(tiny_model_dir), "--out", str(out),
               "--text-precision", "fp32"])
    text = capsys.readouterr().out
    assert rc == 0 and "5 usable images" in text and "cache hit rate 100%" in text
    with pytest.raises(SystemExit, match="give exactly one of --images"):
        main(["build-dataset", "--model", str(tiny_model_dir)])


def test_run_summary_lands_in_the_run_folder(edit_build, model, tmp_path):
    _, config, manifest_path = edit_build
    calls = []
    manifest = resolve_training_manifest(
        dataset_manifests=(), data_backend_config=config.path, model=model, out_dir=tmp_path / "run",
        is_main=True, barrier=lambda: calls.append("barrier"))
    assert calls == ["barrier"] and len(manifest.items) == 5
    record = json.loads((tmp_path / "run" / RUN_REPORT_FILE).read_text(encoding="utf-8"))
    assert record["usable_images"] == 5 and set(record["datasets"]) == {"strict", "loose", "edits", "styles"}
    assert record["datasets"]["styles"]["skipped"][0]["reason"].startswith("too small")
    assert "dataset styles (image)" in (tmp_path / "run" / RUN_SUMMARY_FILE).read_text(encoding="utf-8")


def test_an_edit_and_its_byte_identical_reference_in_two_latent_caches(tmp_path, model):
    """The same image bytes, planned alike, in two datasets with their own cache_dir_vae: encoded once, written
    to both caches, and the first build trains (it once failed with FileNotFoundError: misses were kept by
    content only, so one folder never got its file)."""
    noise_png(tmp_path / "edits" / "e1.png", (64, 64), seed=1, caption="keep it")
    (tmp_path / "refs").mkdir()
    shutil.copyfile(tmp_path / "edits" / "e1.png", tmp_path / "refs" / "e1.png")
    config = load_backend_config(_write_config(tmp_path, [
        {"id": "edits", "instance_data_dir": "edits", "resolution": 64, "cache_dir_vae": "cache/edits",
         "conditioning_data": "refs"},
        {"id": "refs", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "refs", "resolution": 64, "cache_dir_vae": "cache/refs"},
    ]))
    manifest_path = build_datasets(config, model=model, out_dir=tmp_path / "built", text_precision="fp32")
    report = load_build_report(manifest_path.parent)
    assert report.vae_images_encoded == 1
    files = {d: sorted(p.name for p in (tmp_path / "cache" / d).glob("*.safetensors")) for d in ("edits", "refs")}
    assert files["edits"] == files["refs"] and len(files["edits"]) == 1
    manifest = load_manifest(manifest_path)
    assert [r.image for r in manifest.items[0].references] == ["e1.png"]
    batch = load_batch(manifest, [0], verify=True)  # both latents read back from their own caches
    assert torch.equal(batch.latents, batch.reference_latents[0])
