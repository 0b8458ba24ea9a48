"""crop_aspect random / closest with crop_aspect_buckets (SimpleTuner's multidatabackend.json option).

Pinned: exact aspects and buckets for given keys (dataset id / image sha256), the parse of both list forms and
every bad value (a ValueError naming the dataset id and the key). Statistical: over 30,000 synthetic keys each
aspect's share is within 0.015 of its weight (about 4.5 standard deviations at p = 0.5; sha256 makes the
draw deterministic, so the test cannot flake). One small build on the tiny FLUX.2 shows the manifest's buckets
are the drawn ones, the cached latents have their shapes and a second build encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from safetensors import safe_open
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, model_files
from flux2_lora_pack.trainer.buckets import choose_bucket, select_crop_aspect
from flux2_lora_pack.trainer.build import build_datasets, plan_for
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.databackend import load_backend_config, parse_backend_config
from flux2_lora_pack.trainer.manifest import load_batch, load_manifest
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.scan import load_training_image, scan_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402

WEIGHTED = ((0.75, 0.2), (1.0, 0.3), (1.5, 0.5))
EQUAL = ((0.5, 1 / 3), (1.0, 1 / 3), (2.0, 1 / 3))
SHAS = [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(8)]



def _write_config(root: Path, entries: list[dict]) -> Path:
    path = root / "multidatabackend.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- geometry


def test_random_aspects_are_pinned_per_key_and_differ_by_dataset_id():
    def draw(ds: str, buckets=WEIGHTED) -> list[float]:
        return [select_crop_aspect(1, 1, crop_aspect="random", crop_aspect_buckets=buckets, random_key=f"{ds}/{s}")
                for s in SHAS]

    assert draw("photos") == [1.5, 1.5, 1.5, 1.5, 1.0, 1.5, 1.5, 1.5]
    assert draw("other") == [0.75, 1.5, 1.0, 1.5, 1.5, 1.5, 1.5, 0.75]
    assert draw("photos") == draw("photos")  # a rebuild draws the same
    # The image's own aspect plays no part: a landscape and a portrait file with one key get one bucket.
    wide = [choose_bucket(1500, 1000, resolution=1024, crop_aspect="random", crop_aspect_buckets=EQUAL,
                          random_key=f"photos/{s}") for s in SHAS]
    tall = [choose_bucket(1000, 1500, resolution=1024, crop_aspect="random", crop_aspect_buckets=EQUAL,
                          random_key=f"photos/{s}") for s in SHAS]
    assert wide == tall == [(1024, 1024), (1456, 720), (1456, 720), (1456, 720), (1024, 1024), (1024, 1024),
                            (1024, 1024), (1456, 720)]


@pytest.mark.parametrize(
    ("aspect", "kwargs", "bucket"),
    [
        (0.75, {"resolution": 1024}, (880, 1184)),  # aspect 0.743, 1,041,920 px
        (1.0, {"resolution": 1024}, (1024, 1024)),
        (1.5, {"resolution": 1024}, (1248, 832)),  # the same bucket crop_aspect preserve gives a 3:2 image
        (4, {"resolution": 1024}, (2048, 512)),
        (0.75, {"resolution": 512, "resolution_type": "pixel"}, (512, 688)),  # shorter side 512
        (1.5, {"resolution": 512, "resolution_type": "pixel"}, (768, 512)),
        (0.75, {"resolution": 1.0, "resolution_type": "area"}, (864, 1152)),
    ],
)
def test_a_chosen_aspect_is_sized_like_preserve(aspect, kwargs, bucket):
    got = choose_bucket(1000, 1000, crop_aspect="random", crop_aspect_buckets=((aspect, 1.0),), random_key="x",
                        **kwargs)
    assert got == bucket and got[0] % 16 == 0 and got[1] % 16 == 0


def test_weights_are_honoured_over_many_images():
    n = 30_000
    weighted = Counter(select_crop_aspect(1, 1, crop_aspect="random", crop_aspect_buckets=WEIGHTED,
                                          random_key=f"d/{i:064x}") for i in range(n))
    assert set(weighted) == {0.75, 1.0, 1.5}
    for aspect, weight in WEIGHTED:
        assert abs(weighted[aspect] / n - weight) < 0.015
    equal = Counter(select_crop_aspect(1, 1, crop_aspect="random", crop_aspect_buckets=EQUAL,
                                       random_key=f"d/{i:064x}") for i in range(n))
    for aspect, _ in EQUAL:
        assert abs(equal[aspect] / n - 1 / 3) < 0.015


@pytest.mark.parametrize(
    ("size", "aspect"),
    [
        ((1500, 1000), 1.5), ((1000, 1500), 0.75), ((1000, 1000), 1.0), ((1100, 1000), 1.0),
        ((2000, 1000), 1.5), ((1000, 2000), 0.75),
        # 1.23 lies between the geometric (1.225) and the plain (1.25) midpoint of 1 and 1.5: log distance
        # says 1.5, and its mirror 1 / 1.23 says 0.75 by the same rule (SimpleTuner's plain difference would not).
        ((123, 100), 1.5), ((100, 123), 0.75),
    ],
)
def test_closest_with_buckets_takes_the_nearest_listed_aspect(size, aspect):
    assert select_crop_aspect(*size, crop_aspect="closest", crop_aspect_buckets=WEIGHTED) == aspect


def test_closest_tie_goes_to_the_wider_aspect_and_listed_closest_differs_from_the_own_list():
    assert select_crop_aspect(64, 64, crop_aspect="closest", crop_aspect_buckets=((0.5, 0.5), (2.0, 0.5))) == 2.0
    # 1100x1000 without a list: the nearest of the maximal buckets; with [0.75, 1, 1.5]: 1.0, so 1024x1024.
    assert choose_bucket(1100, 1000, resolution=1024) == (1072, 976)
    assert choose_bucket(1100, 1000, resolution=1024, crop_aspect_buckets=WEIGHTED) == (1024, 1024)
    # Without crop the list is not used (the parser refuses that combination).
    assert choose_bucket(1100, 1000, resolution=1024, crop=False, crop_aspect_buckets=WEIGHTED) == (1072, 976)


def test_geometry_refuses_random_without_a_list_or_crop():
    with pytest.raises(ValueError, match="crop_aspect 'random' needs crop true and a non-empty crop_aspect_buckets"):
        choose_bucket(100, 100, resolution=64, crop_aspect="random")
    with pytest.raises(ValueError, match="crop_aspect 'random' needs crop true"):
        choose_bucket(100, 100, resolution=64, crop=False, crop_aspect="random", crop_aspect_buckets=WEIGHTED)


# ------------------------------------------------------------------------------------------- parsing


def _parse(tmp_path: Path, entry: dict, *extra: dict):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    raw = {"id": "a", "type": "local", "instance_data_dir": "imgs"} | entry
    return parse_backend_config([raw, *extra], base_dir=tmp_path)


def test_parses_both_list_forms(tmp_path):
    plain = _parse(tmp_path, {"crop_aspect": "random", "crop_aspect_buckets": [0.75, 1, 1.5]}).datasets[0]
    assert plain.crop_aspect_buckets == ((0.75, 1 / 3), (1.0, 1 / 3), (1.5, 1 / 3))
    weighted = _parse(tmp_path, {"crop_aspect": "random", "crop_aspect_buckets": [
        {"aspect": 1, "weight": 0.7}, {"aspect": 1.5, "weight": 0.3}]})
    assert weighted.datasets[0].crop_aspect_buckets == ((1.0, 0.7), (1.5, 0.3)) and weighted.warnings == ()
    closest = _parse(tmp_path, {"crop_aspect": "closest", "crop_aspect_buckets": [{"aspect": 1}, {"aspect": 2}]})
    assert closest.datasets[0].crop_aspect_buckets == ((1.0, 1.0), (2.0, 1.0)) and closest.warnings == ()
    unused = _parse(tmp_path, {"crop_aspect": "closest", "crop_aspect_buckets": [{"aspect": 1, "weight": 0.5},
                                                                                 {"aspect": 2, "weight": 0.5}]})
    assert unused.warnings == ("dataset 'a': crop_aspect_buckets weights are not used by crop_aspect closest "
                               "(only random draws by weight)",)
    assert _parse(tmp_path, {"crop_aspect": "random", "crop_aspect_buckets": [1.0, 1.5],
                             "crop": "true"}).datasets[0].crop
    # A strict reference follows its edit image: its list is reported as unused, not refused.
    strict = _parse(tmp_path, {"conditioning_data": ["c"]},
                    {"id": "c", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
                     "instance_data_dir": "imgs", "crop_aspect": "random", "crop_aspect_buckets": [1.0]})
    assert strict.warnings == ("dataset 'c': crop_aspect_buckets is not used by a reference_strict dataset (each "
                               "reference takes its edit image's bucket and crop)",)
    # The resolved list survives the JSON summary.
    assert json.loads(json.dumps(weighted.to_dict()))["datasets"][0]["crop_aspect_buckets"] == [[1.0, 0.7], [1.5, 0.3]]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"crop_aspect": "random"}, r"dataset 'a': crop_aspect_buckets is required with crop_aspect random"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1.0], "crop": False},
         r"dataset 'a': crop is false, but crop_aspect random crops"),
        ({"crop_aspect": "closest", "crop_aspect_buckets": [1.0], "crop": False},
         r"dataset 'a': crop is false, but crop_aspect closest with crop_aspect_buckets"),
        ({"crop_aspect": "square", "crop_aspect_buckets": [1.0]},
         r"dataset 'a': crop_aspect_buckets is only used by crop_aspect random or closest, but crop_aspect is 'square'"),
        ({"crop_aspect_buckets": [1.0], "crop_aspect": "preserve"}, r"dataset 'a': crop_aspect_buckets is only used"),
        ({"crop_aspect": "random", "crop_aspect_buckets": []}, r"dataset 'a': crop_aspect_buckets is \[\]; give a non-empty list"),
        ({"crop_aspect": "random", "crop_aspect_buckets": 1.5}, r"dataset 'a': crop_aspect_buckets is 1.5; give a non-empty list"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1.0, "1.5"]}, r"dataset 'a': crop_aspect_buckets\[1\] is '1.5'; give an aspect ratio"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [True]}, r"dataset 'a': crop_aspect_buckets\[0\] is True; give an aspect"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [0]}, r"dataset 'a': crop_aspect_buckets\[0\] is 0; give an aspect ratio .* finite number > 0"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [-1.5]}, r"dataset 'a': crop_aspect_buckets\[0\] is -1.5"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [float("inf")]}, r"dataset 'a': crop_aspect_buckets\[0\] is inf"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [float("nan")]}, r"dataset 'a': crop_aspect_buckets\[0\] is nan"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1.0, 5]}, r"dataset 'a': crop_aspect_buckets\[1\] is 5; aspect ratios must lie in \[0.25, 4\]"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [0.2]}, r"dataset 'a': crop_aspect_buckets\[0\] is 0.2; aspect ratios must lie"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1, 1.0]}, r"dataset 'a': crop_aspect_buckets\[1\] repeats aspect 1.0"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1.0, {"aspect": 1.5, "weight": 1}]},
         r"dataset 'a': crop_aspect_buckets\[1\] is \{.*\}, but crop_aspect_buckets\[0\] is a number"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.5, "weight": 1}, 1.0]},
         r"dataset 'a': crop_aspect_buckets\[1\] is 1.0, but crop_aspect_buckets\[0\] is an object"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect_ratio": 1.5, "weight": 1}]},
         r"dataset 'a': crop_aspect_buckets\[0\].aspect_ratio is not a key of a crop_aspect_buckets entry; the keys are aspect and weight"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.5, "weight": 1, "bucket": 2}]},
         r"dataset 'a': crop_aspect_buckets\[0\].bucket is not a key"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"weight": 1}]},
         r"dataset 'a': crop_aspect_buckets\[0\].aspect is missing"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.5}]},
         r"dataset 'a': crop_aspect_buckets\[0\].weight is missing .* weight > 0, all summing to 1"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.5, "weight": 0}, {"aspect": 1, "weight": 1}]},
         r"dataset 'a': crop_aspect_buckets\[0\].weight is 0; give a number > 0"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.5, "weight": "1"}]},
         r"dataset 'a': crop_aspect_buckets\[0\].weight is '1'"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 0, "weight": 1}]},
         r"dataset 'a': crop_aspect_buckets\[0\].aspect is 0; give an aspect ratio"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1, "weight": 0.5}, {"aspect": 1.5, "weight": 0.4}]},
         r"dataset 'a': crop_aspect_buckets weights sum to 0.9; they must sum to 1 \(within 1e-6\)"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1, "weight": 0.5}, {"aspect": 1.5, "weight": 0.500002}]},
         r"weights sum to 1.000002; they must sum to 1"),
    ],
)
def test_bad_values_name_the_dataset_and_key(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        _parse(tmp_path, entry)


def test_weights_within_the_tolerance_are_accepted(tmp_path):
    spec = _parse(tmp_path, {"crop_aspect": "random", "crop_aspect_buckets": [
        {"aspect": 1, "weight": 0.1}, {"aspect": 1.5, "weight": 0.2}, {"aspect": 0.75, "weight": 0.7000005}]})
    assert [a for a, _ in spec.datasets[0].crop_aspect_buckets] == [1.0, 1.5, 0.75]


# ------------------------------------------------------------------------------------------- building

ASPECT_BUCKETS_64 = {0.5: (48, 96), 1.0: (64, 64), 2.0: (96, 48)}
"""Buckets of about 64^2 pixels for the listed aspects (sides multiples of 16)."""


@pytest.fixture(scope="module")
def random_build(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("random_aspect")
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (80, 80), (72, 64)]):
        noise_png(root / "imgs" / f"i{i}.png", size, seed=i, caption=f"photo {i}")
        noise_png(root / "loose" / f"i{i}.png", size[::-1], seed=40 + i)
    path = _write_config(root, [
        {"id": "rand", "instance_data_dir": "imgs", "resolution": 64, "crop_aspect": "random", "crop_style": "random",
         "crop_aspect_buckets": [{"aspect": 0.5, "weight": 0.25}, {"aspect": 1, "weight": 0.25},
                                 {"aspect": 2, "weight": 0.5}], "conditioning_data": ["loose"]},
        {"id": "loose", "dataset_type": "conditioning", "conditioning_type": "reference_loose",
         "instance_data_dir": "loose", "resolution": 64, "crop_aspect": "random", "crop_aspect_buckets": [0.5, 1, 2]},
        {"id": "near", "instance_data_dir": "imgs", "resolution": 64, "crop_aspect": "closest",
         "crop_aspect_buckets": [0.5, 2]},
    ])
    config = load_backend_config(path)
    model = inspect_model_folder(tiny_model_dir)
    manifest = build_datasets(config, model=model, out_dir=root / "built", text_precision="fp32")
    return root, config, model, manifest


def test_build_uses_the_drawn_buckets_and_their_latent_shapes(random_build):
    root, config, model, manifest_path = random_build
    manifest = load_manifest(manifest_path)
    specs = {s.id: s for s in (*config.datasets, *config.conditioning.values())}

    def expected(source: str, sha: str, width: int, height: int) -> tuple[int, int]:
        spec = specs[source]
        aspect = select_crop_aspect(width, height, crop_aspect=spec.crop_aspect,
                                    crop_aspect_buckets=spec.crop_aspect_buckets, random_key=f"{source}/{sha}")
        return ASPECT_BUCKETS_64[aspect]

    # closest with [0.5, 2]: squares tie and go to the wider 2.0; portraits get 0.5.
    near = [(it.image, it.bucket) for it in manifest.items if it.source == "near"]
    assert near == [("i0.png", (96, 48)), ("i1.png", (96, 48)), ("i2.png", (48, 96)), ("i3.png", (96, 48)),
                    ("i4.png", (96, 48))]
    rand = [it for it in manifest.items if it.source == "rand"]
    assert [it.image for it in rand] == [f"i{i}.png" for i in range(5)]
    targets = [it.bucket for it in rand]
    refs = [it.references[0].bucket for it in rand]
    assert targets == [expected("rand", it.image_sha256, it.width, it.height) for it in rand]
    assert refs == [expected("loose", r.image_sha256, r.width, r.height) for r in (it.references[0] for it in rand)]
    assert set(targets) | set(refs) <= set(ASPECT_BUCKETS_64.values()) and len(set(targets) | set(refs)) >= 2
    for i, it in enumerate(manifest.items):
        files = [(manifest.latent_path(i), it.bucket),
                 *((manifest.reference_latent_path(i, k), r.bucket) for k, r in enumerate(it.references))]
        for latent_file, bucket in files:
            with safe_open(str(latent_file), framework="pt") as f:
                shapes = {tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            assert shapes == {(flux2.PATCHIFIED_CHANNELS, bucket[1] // 16, bucket[0] // 16)}
        batch = load_batch(manifest, [i])
        assert tuple(batch.latents.shape) == (1, flux2.PATCHIFIED_CHANNELS, it.bucket[1] // 16, it.bucket[0] // 16)
    # The cached latent is the drawn crop of the image: equal to encoding that crop directly (same fp32 path).
    first = rand[0]
    plan = plan_for(next(im for im in scan_image_folder(root / "imgs").images if im.relpath == "i0.png"),
                     specs["rand"], step=16)
    assert (plan.bucket, plan.crop) == (first.bucket, first.crop)
    vae = model_files.load_vae(model, precision="fp32")
    pixels = load_training_image(root / "imgs" / "i0.png", plan=plan)
    assert_close(load_batch(manifest, [manifest.items.index(first)]).latents,
                 flux2.encode_images(vae, pixels[None]), atol=1e-5, rtol=1e-5)
    source = next(s for s in json.loads(manifest_path.read_text(encoding="utf-8"))["sources"] if s["id"] == "rand")
    assert source["crop_aspect_buckets"] == [[0.5, 0.25], [1.0, 0.25], [2.0, 0.5]]


def test_second_build_draws_the_same_and_encodes_nothing(random_build, monkeypatch):
    root, config, model, manifest_path = random_build
    before = load_manifest(manifest_path)

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although every random crop is cached")

    monkeypatch.setattr(model_files, "load_vae", refuse)
    monkeypatch.setattr(model_files, "load_text_encoder", refuse)
    again = build_datasets(load_backend_config(config.path), model=model, out_dir=manifest_path.parent,
                           text_precision="fp32")
    report = load_build_report(again.parent)
    assert (report.vae_images_encoded, report.prompts_encoded, report.latents_reused) == (0, 0, 15)
    after = load_manifest(again)
    assert [(it.bucket, it.crop, it.latent) for it in after.items] == [(it.bucket, it.crop, it.latent) for it in before.items]
    assert after.fingerprint == before.fingerprint
