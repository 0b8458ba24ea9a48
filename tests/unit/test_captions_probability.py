"""Several captions per image (each line of a caption file) and per-dataset probability.

Captions: which captions are scanned and cached, which one a sample trains with (a hash of seed, epoch, item
and copy: the same across a resume and across 1 process x batch 2 vs 2 processes x batch 1), every caption
drawn over enough epochs, old manifests still load, merged manifests keep every cache path absolute.
Probability: every batch once per epoch, probability 0 left out, a heavy dataset's batches come earlier,
bad values refused by dataset id and key.

Images are tiny synthetic PNGs; encoders are the session's tiny FLUX.2. Embeddings of a chosen caption are
compared with atol = rtol = 0: they must be read from that caption's own cache file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from torch.testing import assert_close

from flux2_lora_pack.trainer.build import build_datasets, dataset_fingerprint
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.databackend import load_backend_config, parse_backend_config
from flux2_lora_pack.trainer.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    DataSource,
    Manifest,
    ManifestItem,
    load_batch,
    load_manifest,
    load_text_embedding,
)
from flux2_lora_pack.trainer.merge import RUN_SUMMARY_FILE, merge_manifests, resolve_training_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.sampler import BatchRef, BucketBatchSampler
from flux2_lora_pack.trainer.scan import scan_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402

# ------------------------------------------------------------------------------------------ scanning


def test_caption_files_split_into_lines(tmp_path):
    noise_png(tmp_path / "a.png", (32, 32), seed=1, caption="\ufeffa red cube\r\n\r\n   a cube, red  \r\nsks cube\r\n")
    noise_png(tmp_path / "b.png", (32, 32), seed=2, caption="a blue sphere\n")
    noise_png(tmp_path / "c.png", (32, 32), seed=3, caption=" \n\t\n")
    noise_png(tmp_path / "d.png", (32, 32), seed=4, caption="old\rmac line ends")
    split = scan_image_folder(tmp_path)
    assert [(im.relpath, im.captions) for im in split.images] == [
        ("a.png", ("a red cube", "a cube, red", "sks cube")),
        ("b.png", ("a blue sphere",)),
        ("c.png", ("",)),  # nothing but blank lines: one empty caption, as before
        ("d.png", ("old", "mac line ends")),
    ]
    assert split.images[0].caption == "a red cube"
    assert "c.png has an empty caption (trained as unconditional)" in split.warnings
    whole = scan_image_folder(tmp_path, disable_multiline_split=True)
    assert [im.captions for im in whole.images] == [
        ("a red cube\r\n\r\n   a cube, red  \r\nsks cube",), ("a blue sphere",), ("",), ("old\rmac line ends",)]
    assert {im.captions for im in scan_image_folder(tmp_path, caption_strategy="filename").images} == {
        ("a",), ("b",), ("c",), ("d",)}
    one = scan_image_folder(tmp_path, caption_strategy="instanceprompt", instance_prompt=" sks toy\n")
    assert {im.captions for im in one.images} == {("sks toy",)}


# ------------------------------------------------------------------------------------------ parsing


def _write_config(root: Path, entries: list[dict]) -> Path:
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_probability_and_split_keys_parse(tmp_path):
    (tmp_path / "imgs").mkdir()
    config = parse_backend_config([
        {"id": "a", "instance_data_dir": "imgs"},
        {"id": "b", "instance_data_dir": "imgs", "probability": 0.25, "disable_multiline_split": True},
        {"id": "c", "instance_data_dir": "imgs", "probability": "3"},
        {"id": "z", "instance_data_dir": "imgs", "probability": 0},
    ], base_dir=tmp_path)
    assert [(d.id, d.probability, d.disable_multiline_split) for d in config.datasets] == [
        ("a", 1.0, False), ("b", 0.25, True), ("c", 3.0, False), ("z", 0.0, False)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "dataset 'a': probability is -1; it must be >= 0"),
        (-0.5, "dataset 'a': probability is -0.5; it must be >= 0"),
        ("often", "dataset 'a': probability is 'often', not a number"),
        (True, "dataset 'a': probability is True, not a number"),
        (float("nan"), "dataset 'a': probability is nan, not a number"),
        (float("inf"), "dataset 'a': probability is inf, not a number"),
        ([1], r"dataset 'a': probability is \[1\], not a number"),
    ],
)
def test_bad_probability_names_dataset_and_key(tmp_path, value, message):
    (tmp_path / "imgs").mkdir()
    path = _write_config(tmp_path, [{"id": "a", "instance_data_dir": "imgs", "probability": value}])
    with pytest.raises(ValueError, match=message):
        load_backend_config(path)  # through JSON: NaN and Infinity are JSON literals Python reads


def test_probability_is_refused_where_it_means_nothing(tmp_path):
    (tmp_path / "imgs").mkdir()
    image = {"id": "a", "instance_data_dir": "imgs", "conditioning_data": ["c"]}
    cond = {"id": "c", "dataset_type": "conditioning", "conditioning_type": "reference_loose", "instance_data_dir": "imgs"}
    with pytest.raises(ValueError, match="dataset 'c': probability applies to image datasets only; remove it from "
                                         "this conditioning dataset"):
        parse_backend_config([image, cond | {"probability": 0.5}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset 't': probability applies to image datasets only; remove it from "
                                         "this text_embeds dataset"):
        parse_backend_config([image, cond, {"id": "t", "dataset_type": "text_embeds", "probability": 1}],
                             base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"every image dataset has probability 0 \(a, b\)"):
        parse_backend_config([{"id": "a", "instance_data_dir": "imgs", "probability": 0},
                              {"id": "b", "instance_data_dir": "imgs", "probability": 0.0}], base_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset 'a': disable_multiline_split is 'maybe'; use true or false"):
        parse_backend_config([{"id": "a", "instance_data_dir": "imgs", "disable_multiline_split": "maybe"}],
                             base_dir=tmp_path)


# ------------------------------------------------------------------------------------------ building

MULTI = {  # file -> (size, caption file text, captions it gives)
    "a.png": ((64, 64), "\ufeffa red cube\r\n\r\n   a cube, red  \r\nsks cube\r\n", ("a red cube", "a cube, red", "sks cube")),
    "b.png": ((64, 64), "a blue sphere\n", ("a blue sphere",)),
    "c.png": ((80, 48), "one\n\ntwo", ("one", "two")),
    "d.png": ((64, 64), "  \n\n", ("",)),
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return inspect_model_folder(tiny_model_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("captions")
    for seed, (name, (size, text, _)) in enumerate(MULTI.items()):
        noise_png(root / "multi" / name, size, seed=seed, caption=text)
    noise_png(root / "whole" / "e.png", (64, 64), seed=10, caption="line one\nline two\n")
    noise_png(root / "inst" / "f.png", (64, 64), seed=11)
    noise_png(root / "inst" / "g.png", (64, 64), seed=12)
    config = load_backend_config(_write_config(root, [
        {"id": "multi", "instance_data_dir": "multi", "resolution": 64},
        {"id": "whole", "instance_data_dir": "whole", "resolution": 64, "disable_multiline_split": True,
         "probability": 0.5},
        {"id": "off", "instance_data_dir": "inst", "resolution": 64, "caption_strategy": "instanceprompt",
         "instance_prompt": "sks toy", "probability": 0},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "write_batch_size": 3},
    ]))
    path = build_datasets(config, model=model, out_dir=root / "out", text_precision="fp32",
                          extra_prompts=["a validation prompt"])
    return root, config, path


def test_every_caption_is_cached_once_and_reported(built):
    root, _, path = built
    manifest = load_manifest(path)
    assert manifest.version == MANIFEST_VERSION == 3
    assert [(it.source, it.image, it.captions) for it in manifest.items] == [
        ("multi", "a.png", MULTI["a.png"][2]), ("multi", "b.png", ("a blue sphere",)),
        ("multi", "c.png", ("one", "two")), ("multi", "d.png", ("",)),
        ("whole", "e.png", ("line one\nline two",)), ("off", "f.png", ("sks toy",)), ("off", "g.png", ("sks toy",)),
    ]
    every = {"a red cube", "a cube, red", "sks cube", "a blue sphere", "one", "two", "", "line one\nline two",
             "sks toy", "a validation prompt"}
    assert set(manifest.text_cache) == every
    report = load_build_report(path.parent)
    assert (report.prompts_encoded, report.prompts_reused) == (len(every), 0)  # one encode per distinct caption
    for item in manifest.items:
        assert item.texts == tuple(manifest.text_cache[c] for c in item.captions)
        assert item.caption == item.captions[0] and item.text == item.texts[0]
    # Only items with several captions carry captions/texts in the file; the rest keep the version 2 shape.
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert [("captions" in it, "texts" in it) for it in raw["items"]] == [
        (True, True), (False, False), (True, True), (False, False), (False, False), (False, False), (False, False)]
    assert {s["id"]: s["probability"] for s in raw["sources"]} == {"multi": 1.0, "whole": 0.5, "off": 0.0}

    multi = report.datasets["multi"]
    assert (multi["captions"], multi["images_with_several_captions"]) == (7, 2)
    assert multi["caption_words"] == {"min": 0, "mean": round(13 / 7, 2), "max": 3, "empty": 1}
    assert (report.captions, report.multi_caption_images) == (10, 2)
    assert (report.datasets["whole"]["probability"], report.datasets["off"]["probability"]) == (0.5, 0.0)
    summary = report.summary()
    assert "10 training captions; 2 images have several (one line of the caption file is drawn per sample)." in summary
    assert "dataset whole (image): 1 found, 1 used, 0 skipped; x1 per epoch; probability 0.5; buckets 64x64: 1" in summary
    assert "dataset off (image): 2 found, 2 used, 0 skipped; x1 per epoch; probability 0; buckets 64x64: 2" in summary
    assert ("warning: dataset 'off' has probability 0: it is built but never sampled (left out of training)"
            in summary)

    # A chosen caption's embedding comes from that caption's own cache entry.
    embeds = []
    for k, caption in enumerate(MULTI["a.png"][2]):
        batch = load_batch(manifest, [0], captions=(k,))
        assert batch.captions == [caption]
        assert_close(batch.prompt_embeds, load_text_embedding(manifest, caption), atol=0, rtol=0)
        embeds.append(batch.prompt_embeds)
    assert not any(bool((embeds[i] == embeds[j]).all()) for i, j in [(0, 1), (0, 2), (1, 2)])
    assert load_batch(manifest, [0, 1]).captions == ["a red cube", "a blue sphere"]  # default: the first
    with pytest.raises(ValueError, match="item 1 has 1 captions; caption choice 1 is out of range"):
        load_batch(manifest, [0, 1], captions=(1, 1))


def test_run_summary_warns_about_probability_zero(built, model, tmp_path):
    _, config, _ = built
    manifest = resolve_training_manifest(
        dataset_manifests=(), data_backend_config=config.path, model=model, out_dir=tmp_path / "run",
        is_main=True, barrier=lambda: None)
    assert manifest.probability("off") == 0.0 and manifest.probability("whole") == 0.5
    text = (tmp_path / "run" / RUN_SUMMARY_FILE).read_text(encoding="utf-8")
    assert "warning: dataset 'off' has probability 0" in text and "2 images have several" in text


def test_fingerprint_changes_with_captions_and_probability():
    item = {"image_sha256": "0" * 64, "caption": "a", "bucket": [64, 64], "crop": [0, 0], "repeats": 1,
            "source": "s"}
    base = dataset_fingerprint([item], model_identity="m")
    assert dataset_fingerprint([item | {"captions": ["a"]}], model_identity="m") == base  # one caption: as before
    two = dataset_fingerprint([item | {"captions": ["a", "b"]}], model_identity="m")
    assert two != base
    assert dataset_fingerprint([item | {"captions": ["a", "c"]}], model_identity="m") not in {base, two}
    assert dataset_fingerprint([item], model_identity="m", probabilities={"s": 1.0}) == base
    half = dataset_fingerprint([item], model_identity="m", probabilities={"s": 0.5})
    assert half != base and half != dataset_fingerprint([item], model_identity="m", probabilities={"s": 0.0})
    # Two identical images with several captions still sort (dicts do not compare).
    dataset_fingerprint([item | {"captions": ["a", "b"]}, item | {"captions": ["a", "c"]}], model_identity="m")


def test_version_1_and_2_manifests_still_load(built):
    _, _, path = built
    raw = json.loads(path.read_text(encoding="utf-8"))
    v2 = raw | {"version": 2,
                "sources": [{k: v for k, v in s.items() if k not in ("probability", "disable_multiline_split")}
                            for s in raw["sources"]],
                "items": [{k: v for k, v in it.items() if k not in ("captions", "texts")} for it in raw["items"]]}
    keep = ("id", "type", "image_dir", "caption_strategy", "instance_prompt", "resolution", "bucket_step", "repeats")
    v1 = v2 | {"version": 1, "sources": [{k: s[k] for k in keep} for s in v2["sources"]],
               "items": [{k: v for k, v in it.items() if k != "references"} for it in v2["items"]]}
    for version, content in ((1, v1), (2, v2)):
        old = path.parent / f"manifest_v{version}.json"
        old.write_text(json.dumps(content), encoding="utf-8")
        manifest = load_manifest(old)
        assert manifest.version == version
        assert [it.captions for it in manifest.items] == [(it["caption"],) for it in raw["items"]]
        assert [it.texts for it in manifest.items] == [(it["text"],) for it in raw["items"]]
        assert {s.id: s.probability for s in manifest.sources.values()} == {"multi": 1.0, "whole": 1.0, "off": 1.0}
        assert len(BucketBatchSampler(manifest, batch_size=1, seed=0)) == 7  # nothing left out any more


def test_manifest_checks_every_caption(built, tmp_path):
    _, _, path = built
    raw = json.loads(path.read_text(encoding="utf-8"))
    bad = path.parent / "bad_manifest.json"

    def refused(items, message, **extra):
        bad.write_text(json.dumps(raw | {"items": items} | extra), encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_manifest(bad)

    first = raw["items"][0]
    refused([first | {"texts": first["texts"][:2]}] + raw["items"][1:], "item 0 .* has 3 captions and 2 texts")
    refused([first | {"captions": first["captions"][:2] + ["never cached"]}] + raw["items"][1:],
            r"item 0 \(a.png\): a caption of it is not in text_cache")
    refused([first | {"captions": ["other"] + first["captions"][1:]}] + raw["items"][1:], "or their first is not")
    cache = dict(raw["text_cache"]) | {"sks cube": "text/missing.safetensors"}
    refused([first | {"texts": first["texts"][:2] + ["text/missing.safetensors"]}] + raw["items"][1:],
            r"1 cache files are missing \(first: text/missing.safetensors\)", text_cache=cache)
    sources = [s | {"probability": -1} if s["id"] == "whole" else s for s in raw["sources"]]
    refused(raw["items"], "source 'whole' has probability -1", sources=sources)


def test_merged_manifests_keep_captions_paths_and_probability(built, tmp_path):
    _, _, path = built
    copy = tmp_path / "copy"
    shutil.copytree(path.parent, copy)
    merged_path = merge_manifests([path, copy / MANIFEST_FILE], out_dir=tmp_path / "merged")
    raw = json.loads(merged_path.read_text(encoding="utf-8"))
    assert raw["version"] == 3
    assert {s["id"]: s["probability"] for s in raw["sources"]} == {
        "multi": 1.0, "whole": 0.5, "off": 0.0, "multi-2": 1.0, "whole-2": 0.5, "off-2": 0.0}
    several = [it for it in raw["items"] if "texts" in it]
    assert len(several) == 4
    for it in several:
        assert all(Path(t).is_absolute() and Path(t).is_file() for t in it["texts"]) and it["texts"][0] == it["text"]
    assert {Path(several[2]["texts"][1]).parent.parent, Path(several[0]["texts"][1]).parent.parent} == {
        copy.resolve(), path.parent.resolve()}
    merged = load_manifest(merged_path)
    assert merged.items[7].captions == MULTI["a.png"][2] and merged.probability("off-2") == 0.0
    sampler = BucketBatchSampler(merged, batch_size=1, seed=3)
    assert {merged.items[i].source for b in sampler.epoch_plan(0) for i in b} == {"multi", "whole", "multi-2", "whole-2"}
    report = load_build_report(merged_path.parent)
    assert (report.captions, report.multi_caption_images) == (20, 4)


# ------------------------------------------------------------------------------------------ sampling


def _manifest(sizes: dict[str, tuple[int, float]], *, captions: int = 1,
              buckets: tuple[tuple[int, int], ...] = ((64, 64),)) -> Manifest:
    """sizes: dataset id -> (items, probability); items alternate over buckets, each with `captions` captions."""
    sources, items = {}, []
    for ds, (count, probability) in sizes.items():
        sources[ds] = DataSource(id=ds, image_dir=Path("/nowhere"), caption_strategy="textfile",
                                      instance_prompt=None, resolution=64, bucket_step=16, repeats=1,
                                      probability=probability)
        for k in range(count):
            n = len(items)
            bucket = buckets[k % len(buckets)]
            texts = tuple(f"text/{n}-{c}.safetensors" for c in range(captions))
            items.append(ManifestItem(
                image=f"{ds}/{k}.png", source=ds, caption=f"{n}-0", image_sha256=f"{n:064x}", width=bucket[0],
                height=bucket[1], bucket=bucket, resized=bucket, crop=(0, 0), latent=f"latents/{n}.safetensors",
                text=texts[0], repeats=1, captions=tuple(f"{n}-{c}" for c in range(captions)), texts=texts))
    return Manifest(path=Path("/nowhere/manifest.json"), version=3, fingerprint="f" * 64, model_identity="m",
                         vae_identity="v", text_identity="t", resolution=64, sources=sources, items=tuple(items),
                         text_cache={}, empty_caption="", extra_prompts=())


def _refs(sampler: BucketBatchSampler, count: int) -> list[BatchRef]:
    it = sampler.iter_batches()
    return [next(it) for _ in range(count)]


def test_caption_choice_is_the_same_for_1x2_and_2x1_and_across_resume():
    # Even counts per bucket: no padding, which differs between 1 and 2 processes by design.
    manifest = _manifest({"a": (8, 1.0), "b": (4, 1.0)}, captions=3, buckets=((64, 64), (80, 48)))
    one = BucketBatchSampler(manifest, batch_size=2, seed=5)
    two = [BucketBatchSampler(manifest, batch_size=1, seed=5, rank=r, world_size=2) for r in range(2)]
    steps = 3 * len(one)
    joined = [(a.indices + b.indices, a.captions + b.captions)
              for a, b in zip(_refs(two[0], steps), _refs(two[1], steps))]
    full = _refs(BucketBatchSampler(manifest, batch_size=2, seed=5), steps)
    assert joined == [(r.indices, r.captions) for r in full]
    assert len({c for r in full for c in r.captions}) == 3  # not always the first

    for cut in (1, len(one) - 1, len(one) + 2):
        first = BucketBatchSampler(manifest, batch_size=2, seed=5)
        _refs(first, cut)
        resumed = BucketBatchSampler(manifest, batch_size=2, seed=5)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert _refs(resumed, steps - cut) == full[cut:]
    other_seed = _refs(BucketBatchSampler(manifest, batch_size=2, seed=6), steps)
    assert [r.captions for r in other_seed] != [r.captions for r in full]


def test_every_caption_is_drawn_over_enough_epochs():
    manifest = _manifest({"a": (4, 1.0)}, captions=3)
    manifest = dataclasses.replace(manifest, items=manifest.items[:3] + (
        dataclasses.replace(manifest.items[3], captions=("3-0",), texts=("text/3-0.safetensors",)),))
    sampler = BucketBatchSampler(manifest, batch_size=2, seed=1)
    seen = Counter((i, c) for r in _refs(sampler, 30 * len(sampler)) for i, c in zip(r.indices, r.captions))
    assert set(seen) == {(i, c) for i in range(3) for c in range(3)} | {(3, 0)}
    assert min(seen[(i, c)] for i in range(3) for c in range(3)) >= 3  # roughly even: 30 draws over 3 captions


def test_each_batch_comes_once_per_epoch_and_probability_zero_is_left_out():
    manifest = _manifest({"a": (9, 1.0), "b": (7, 0.3), "c": (5, 0.0)}, buckets=((64, 64), (80, 48)))
    sampler = BucketBatchSampler(manifest, batch_size=2, seed=2)
    # a: 5 + 4 items in two buckets -> 3 + 2 batches; b: 4 + 3 -> 2 + 2; c: none.
    assert len(sampler) == 9
    for epoch in range(4):
        plan = sampler.epoch_plan(epoch)
        counts = Counter(i for b in plan for i in b)
        assert counts == Counter({i: 1 for i in range(16)})
        for batch in plan:
            assert len({(manifest.items[i].source, manifest.items[i].bucket) for i in batch}) == 1
    assert sampler.epoch_plan(0) != sampler.epoch_plan(1)
    # Rank slices of the same global batches; padding on 2 ranks never reaches dataset c either.
    ranks = [BucketBatchSampler(manifest, batch_size=1, seed=2, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        plan = ranks[0].epoch_plan(epoch)
        assert [a + b for a, b in zip(ranks[0].rank_batches(epoch), ranks[1].rank_batches(epoch))] == plan
        assert {manifest.items[i].source for b in plan for i in b} == {"a", "b"}

    nothing = _manifest({"a": (3, 0.0), "b": (2, 0.0)})
    with pytest.raises(ValueError, match=r"every dataset with items has probability 0 \(a, b\)"):
        BucketBatchSampler(nothing, batch_size=1, seed=0)


def test_a_heavy_dataset_comes_earlier_in_the_epoch():
    def mean_positions(weights: tuple[float, float]) -> tuple[float, float]:
        manifest = _manifest({"heavy": (20, weights[0]), "light": (20, weights[1])})
        sampler = BucketBatchSampler(manifest, batch_size=1, seed=11)
        where: dict[str, list[int]] = {"heavy": [], "light": []}
        for epoch in range(5):
            for position, batch in enumerate(sampler.epoch_plan(epoch)):
                where[manifest.items[batch[0]].source].append(position)
        return tuple(sum(p) / len(p) for p in (where["heavy"], where["light"]))

    heavy, light = mean_positions((0.95, 0.05))
    # 40 batches per epoch: about 10.5 vs 29.5 when the heavy one is drawn 95% of the time.
    assert heavy + 12 < light, (heavy, light)
    heavy, light = mean_positions((0.05, 0.95))
    assert light + 12 < heavy, (heavy, light)
    heavy, light = mean_positions((1.0, 1.0))
    assert abs(heavy - light) < 6, (heavy, light)  # equal weights interleave


def test_probability_plan_is_the_same_for_1x2_and_2x1_and_resumes():
    manifest = _manifest({"a": (8, 0.9), "b": (4, 0.1), "c": (4, 2.0)}, buckets=((64, 64), (80, 48)))
    one = BucketBatchSampler(manifest, batch_size=2, seed=4)
    two = [BucketBatchSampler(manifest, batch_size=1, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        assert [a + b for a, b in zip(two[0].rank_batches(epoch), two[1].rank_batches(epoch))] == one.rank_batches(epoch)
    full = _refs(BucketBatchSampler(manifest, batch_size=2, seed=4), 3 * len(one))
    first = BucketBatchSampler(manifest, batch_size=2, seed=4)
    _refs(first, len(one) + 1)
    resumed = BucketBatchSampler(manifest, batch_size=2, seed=4)
    resumed.load_state_dict(first.state_dict())
    assert _refs(resumed, 2 * len(one) - 1) == full[len(one) + 1:]


def test_one_dataset_ignores_its_probability_and_old_states_resume_on_one_dataset_only():
    single = [BucketBatchSampler(_manifest({"a": (9, p)}, buckets=((64, 64), (80, 48))), batch_size=2, seed=3)
              for p in (1.0, 0.2)]
    assert single[0].epoch_plan(0) == single[1].epoch_plan(0)
    state = single[0].state_dict() | {"version": 2}
    single[1].load_state_dict(state)  # a one-dataset plan did not change: the old state is still valid
    several = BucketBatchSampler(_manifest({"a": (4, 1.0), "b": (4, 1.0)}), batch_size=1, seed=3)
    with pytest.raises(ValueError, match=r"version 2\) comes from a trainer that ordered the batches of several "
                                         r"datasets \(a, b\) differently"):
        several.load_state_dict(several.state_dict() | {"version": 2})
    with pytest.raises(ValueError, match="sampler state version 1 is not 3"):
        several.load_state_dict(several.state_dict() | {"version": 1})


def test_all_weights_checked_finite_at_build(built, model, tmp_path):
    _, config, _ = built
    bad = dataclasses.replace(config, datasets=tuple(dataclasses.replace(d, probability=math.inf)
                                                     if d.id == "whole" else d for d in config.datasets))
    with pytest.raises(ValueError, match="dataset 'whole': probability is inf; give a finite weight >= 0"):
        build_datasets(bad, model=model, out_dir=tmp_path / "out")
    zero = dataclasses.replace(config, datasets=tuple(dataclasses.replace(d, probability=0.0) for d in config.datasets))
    with pytest.raises(ValueError, match=r"every image dataset has probability 0 \(multi, whole, off\)"):
        build_datasets(zero, model=model, out_dir=tmp_path / "out")


def test_cli_build_dataset_can_keep_whole_caption_files(tmp_path, tiny_model_dir, capsys):
    from flux2_lora_pack.trainer.__main__ import main

    noise_png(tmp_path / "imgs" / "a.png", (64, 64), seed=1, caption="first line\nsecond line")
    out = {}
    for flag in ([], ["--disable-multiline-split"]):
        dest = tmp_path / ("whole" if flag else "split")
        assert main(["build-dataset", "--images", str(tmp_path / "imgs"), "--model", str(tiny_model_dir), "--out",
                     str(dest), "--resolution", "64", "--text-precision", "fp32", *flag]) == 0
        out[bool(flag)] = load_manifest(dest).items[0].captions
    capsys.readouterr()
    assert out == {False: ("first line", "second line"), True: ("first line\nsecond line",)}
