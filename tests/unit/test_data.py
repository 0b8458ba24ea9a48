"""Dataset: buckets and crops, folder scanning and its refusals, cached build, manifest, sampler, batches.

Images are tiny synthetic files written with PIL into tmp_path; encoders are the session's tiny FLUX.2.
Float comparisons: cached tensors against a fresh encode of the same input, atol 1e-5 / rtol 1e-5 (same fp32
code path; the tolerance only absorbs batch-size-dependent kernel rounding); pixel checks atol 0.02 (1/255
rounding of Lanczos output near flat regions).
"""

from __future__ import annotations

import json
import os
import re
import struct
import weakref
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2, model_files
from flux2_lora_pack.trainer.buckets import assign_bucket, bucket_sizes, plan_crop
from flux2_lora_pack.trainer.build import build_dataset
from flux2_lora_pack.trainer.build_report import load_build_report
from flux2_lora_pack.trainer.cache import read_entry
from flux2_lora_pack.trainer.manifest import (
    Manifest,
    ManifestItem,
    load_batch,
    load_manifest,
    load_text_embedding,
)
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.sampler import BatchRef, BucketBatchSampler
from flux2_lora_pack.trainer.scan import MAX_IMAGE_PIXELS, load_training_image, scan_image_folder

RES = 64  # small buckets keep the tiny VAE fast


def _noise_image(path: Path, size: tuple[int, int], *, seed: int, mode: str = "RGB", **save) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode).save(path, **save)
    return path


def _captioned(folder: Path, name: str, size: tuple[int, int], caption: str, *, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = _noise_image(folder / name, size, seed=seed)
    path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _huge_png(path: Path, *, side: int = 20000) -> Path:
    """A valid side x side 1-bit PNG, about 50 kB on disk, written without ever holding the pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# -------------------------------------------------------------------------------------------------- cache


def test_cache_entries_round_trip_and_refuse_damage(tmp_path):
    from flux2_lora_pack.trainer.cache import CacheEntryError, write_entry

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.float32)}
    path = tmp_path / "k1.safetensors"
    write_entry(path, tensors, kind="text", key="k1", metadata={"truncated": "1"})
    assert [p.name for p in tmp_path.iterdir()] == ["k1.safetensors"]  # no temporary file left behind
    loaded, meta = read_entry(path, kind="text", key="k1")
    assert meta["truncated"] == "1" and set(loaded) == {"a", "b"}
    for name in tensors:
        assert loaded[name].dtype == tensors[name].dtype
        assert torch.equal(loaded[name], tensors[name])
    with pytest.raises(CacheEntryError, match="holds 'text', expected 'latent'"):
        read_entry(path, kind="latent")
    with pytest.raises(CacheEntryError, match="belongs to key 'k1', expected 'k2'"):
        read_entry(path, kind="text", key="k2")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    read_entry(path, kind="text", verify_digest=False)  # structurally fine: only the checksum can tell
    with pytest.raises(CacheEntryError, match="fails its checksum"):
        read_entry(path, kind="text")
    path.write_bytes(bytes(raw[:-10]))
    with pytest.raises(CacheEntryError, match="unreadable"):
        read_entry(path, kind="text", verify_digest=False)


# ------------------------------------------------------------------------------------------------ buckets


def test_bucket_sizes_are_maximal_symmetric_multiples_of_16():
    area = 512 * 512
    buckets = bucket_sizes(512)
    assert len(buckets) == 33
    assert {(512, 512), (624, 416), (416, 624), (1024, 256), (256, 1024)} <= set(buckets)
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= area
        assert (w + 16) * h > area and w * (h + 16) > area  # maximal: no side can grow by a step
        assert 0.25 <= w / h <= 4
        assert (h, w) in buckets
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])


@pytest.mark.parametrize(
    ("size", "bucket", "resized", "crop"),
    [
        ((512, 512), (512, 512), (512, 512), (0, 0)),
        ((768, 512), (624, 416), (624, 416), (0, 0)),  # 3:2 exists exactly: 624 x 416
        ((512, 768), (416, 624), (416, 624), (0, 0)),
        ((1000, 200), (1024, 256), (1280, 256), (128, 0)),  # 5:1 beyond the 4:1 limit -> widest bucket, cropped
        ((200, 1000), (256, 1024), (256, 1280), (0, 128)),
        ((500, 700), (432, 592), (432, 605), (0, 6)),  # scale 0.864: 700 * 0.864 = 604.8 -> 605, (605-592)//2 = 6
        ((1920, 1080), (672, 384), (683, 384), (5, 0)),  # 16:9 -> 7:4; scale 0.3556: 1920 -> 683
        ((40, 40), (512, 512), (512, 512), (0, 0)),  # upscaled
    ],
)
def test_assign_bucket_and_crop_exact(size, bucket, resized, crop):
    assert assign_bucket(*size, resolution=512) == bucket
    plan = plan_crop(*size, bucket=bucket)
    assert (plan.bucket, plan.resized, plan.crop) == (bucket, resized, crop)


def test_bucket_arguments_are_checked():
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_sizes(512, step=8)
    with pytest.raises(ValueError, match="min_aspect"):
        bucket_sizes(512, min_aspect=2.0)
    with pytest.raises(ValueError, match="resolution"):
        bucket_sizes(8)


def test_training_image_is_resized_and_center_cropped(tmp_path):
    # 1000x200 at RES 64 -> bucket 128x32, scale 0.16, resized 160x32, crop left 16 (= 100 source pixels).
    pixels = np.zeros((200, 1000, 3), dtype=np.uint8)
    pixels[:, :100] = (255, 0, 0)
    pixels[:, 100:900] = (0, 255, 0)
    pixels[:, 900:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    bucket = assign_bucket(1000, 200, resolution=RES)
    plan = plan_crop(1000, 200, bucket=bucket)
    assert (plan.bucket, plan.resized, plan.crop) == ((128, 32), (160, 32), (16, 0))
    image = load_training_image(tmp_path / "wide.png", plan=plan)
    assert image.shape == (3, 32, 128)
    green = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 120)
    # The red and blue bands are cropped away; 4 columns each side may hold Lanczos ringing from the band edges.
    assert_close(image[:, :, 4:-4], green, atol=0.02, rtol=0)
    assert image[0].max() < 0.0 and image[2].max() < 0.0  # no red or blue survives anywhere


def test_exif_rotation_and_transparency(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 64 wide, shown 64 tall
    _noise_image(folder / "rotated.jpg", (64, 32), seed=1, exif=exif.tobytes())
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(folder / "clear.png")
    scan = scan_image_folder(folder, caption_strategy="filename")
    sizes = {im.relpath: (im.width, im.height) for im in scan.images}
    assert sizes == {"rotated.jpg": (32, 64), "clear.png": (32, 32)}
    rotated = load_training_image(folder / "rotated.jpg", plan=plan_crop(32, 64, bucket=(32, 64)))
    assert rotated.shape == (3, 64, 32)
    clear = load_training_image(folder / "clear.png", plan=plan_crop(32, 32, bucket=(32, 32)))
    assert_close(clear, torch.ones(3, 32, 32), atol=0, rtol=0)  # fully transparent -> white


# ---------------------------------------------------------------------------------------------- scanning


def test_caption_strategies(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _noise_image(folder / "a_red__cube.png", (32, 32), seed=0)
    (folder / "a_red__cube.txt").write_bytes("\ufeff  a red cube, studio light \n".encode("utf-8"))
    sub = folder / "sub"
    sub.mkdir()
    _noise_image(sub / "b.PNG", (32, 32), seed=1)
    (sub / "b.txt").write_text("nested caption", encoding="utf-8")

    by_text = scan_image_folder(folder)
    assert [(im.relpath, im.caption) for im in by_text.images] == [
        ("a_red__cube.png", "a red cube, studio light"),
        ("sub/b.PNG", "nested caption"),
    ]
    by_name = scan_image_folder(folder, caption_strategy="filename")
    assert [im.caption for im in by_name.images] == ["a red cube", "b"]
    by_instance = scan_image_folder(folder, caption_strategy="instanceprompt", instance_prompt=" sks toy ")
    assert [im.caption for im in by_instance.images] == ["sks toy", "sks toy"]
    assert by_text.skipped == [] and by_name.skipped == []

    with pytest.raises(ValueError, match="needs a non-empty instance_prompt"):
        scan_image_folder(folder, caption_strategy="instanceprompt")
    with pytest.raises(ValueError, match="not one of textfile, filename, instanceprompt"):
        scan_image_folder(folder, caption_strategy="json")
    ignored = scan_image_folder(folder, instance_prompt="unused")
    assert any("instance_prompt 'unused' is ignored" in w for w in ignored.warnings)


def test_bad_inputs_are_skipped_with_reasons(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    _captioned(folder, "good.png", (48, 32), "good", seed=0)
    for name in ("zero.png", "text.png", "trunc.png", "trunc.jpg", "small.png", "huge.png", "nocap.png",
                 "latin1.png", "anim.gif", "dangling.png"):
        (folder / name).with_suffix(".txt").write_text(name, encoding="utf-8")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not a png", encoding="utf-8")
    full = _noise_image(tmp_path / "full.png", (64, 64), seed=1).read_bytes()
    (folder / "trunc.png").write_bytes(full[: len(full) // 2])
    full = _noise_image(tmp_path / "full.jpg", (64, 64), seed=2).read_bytes()
    (folder / "trunc.jpg").write_bytes(full[: len(full) // 2])
    _noise_image(folder / "small.png", (64, 8), seed=3)
    _huge_png(folder / "huge.png")
    _noise_image(folder / "nocap.png", (32, 32), seed=4)
    (folder / "nocap.txt").unlink()
    _noise_image(folder / "latin1.png", (32, 32), seed=5)
    (folder / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    Image.new("RGB", (32, 32)).save(folder / "anim.gif")
    (folder / "dangling.png").symlink_to(tmp_path / "does-not-exist.png")
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a symlink loop: visited once
    (folder / ".hidden.png").write_bytes(b"")  # hidden files are not part of a dataset

    scan = scan_image_folder(folder, min_side_px=16)
    assert [im.relpath for im in scan.images] == ["good.png"]
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert set(reasons) == {"zero.png", "text.png", "trunc.png", "trunc.jpg", "small.png", "huge.png", "nocap.png",
                            "latin1.png", "anim.gif", "dangling.png"}
    assert reasons["zero.png"] == "zero-byte file"
    assert reasons["text.png"].startswith("not an image")
    assert reasons["trunc.png"].startswith("corrupt or truncated image")
    assert reasons["trunc.jpg"].startswith("corrupt or truncated image")
    assert reasons["small.png"].startswith("too small: 64x8")
    assert reasons["huge.png"].startswith("too large")
    assert reasons["nocap.png"].startswith("missing caption: no nocap.txt")
    assert reasons["latin1.png"].startswith("caption file latin1.txt is not UTF-8 (byte 0xe9 at offset 3)")
    assert reasons["anim.gif"].startswith("not an image file")
    assert reasons["dangling.png"] == "broken symbolic link"

    # With Pillow's own bomb guard switched off (some node packs do), the header check still refuses it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    scan = scan_image_folder(folder)
    assert {s.path.name: s.reason for s in scan.skipped}["huge.png"] == (
        f"too large: 20000x20000 = 400000000 pixels is above {MAX_IMAGE_PIXELS}; downscale it first"
    )


def test_unusable_folders_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"image folder {empty.resolve()} has no usable images")):
        scan_image_folder(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"has no usable images \(1 skipped: x.png: zero-byte file\)"):
        scan_image_folder(bad)
    with pytest.raises(ValueError, match="is not a folder"):
        scan_image_folder(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- sampling


def _fake_manifest(buckets: list[tuple[int, int]], *, repeats: list[int] | None = None) -> Manifest:
    repeats = repeats or [1] * len(buckets)
    items = tuple(
        ManifestItem(image=f"{i}.png", source="default", caption=f"c{i}", image_sha256=f"{i:064x}", width=b[0],
                          height=b[1], bucket=b, resized=b, crop=(0, 0), latent=f"latents/{i}.safetensors",
                          text=f"text/{i}.safetensors", repeats=r)
        for i, (b, r) in enumerate(zip(buckets, repeats))
    )
    return Manifest(path=Path("/nowhere/manifest.json"), version=1, fingerprint="f" * 64, model_identity="m",
                         vae_identity="v", text_identity="t", resolution=64, sources={}, items=items,
                         text_cache={}, empty_caption="", extra_prompts=())


# 23 items: 10 square, 7 wide, 6 tall.
BUCKETS = [(64, 64)] * 10 + [(80, 48)] * 7 + [(48, 80)] * 6


def _epoch(sampler: BucketBatchSampler) -> list[BatchRef]:
    it = sampler.iter_batches()
    return [next(it) for _ in range(len(sampler))]


def test_sampler_epoch_covers_every_copy_once_in_single_bucket_batches():
    manifest = _fake_manifest(BUCKETS, repeats=[1] * 20 + [3, 3, 3])
    sampler = BucketBatchSampler(manifest, batch_size=4, seed=7)
    # buckets hold 10, 7 and 6 + 6 repeated copies: ceil(10/4) + ceil(7/4) + ceil(12/4) = 3 + 2 + 3
    assert len(sampler) == 8
    batches = _epoch(sampler)
    counts = Counter(i for b in batches for i in b.indices)
    assert counts == Counter({i: (3 if i >= 20 else 1) for i in range(23)})
    for b in batches:
        assert {manifest.items[i].bucket for i in b.indices} == {b.bucket}
        assert 1 <= len(b.indices) <= 4
    assert [b.position for b in batches] == list(range(8)) and {b.epoch for b in batches} == {0}

    dropping = BucketBatchSampler(manifest, batch_size=4, seed=7, drop_last=True)
    assert len(dropping) == 2 + 1 + 3 and all(len(b.indices) == 4 for b in _epoch(dropping))


def test_sampler_is_deterministic_per_seed_and_reshuffles_per_epoch():
    manifest = _fake_manifest(BUCKETS)
    plan = BucketBatchSampler(manifest, batch_size=2, seed=1).epoch_plan
    assert plan(0) == BucketBatchSampler(manifest, batch_size=2, seed=1).epoch_plan(0)
    assert plan(0) != BucketBatchSampler(manifest, batch_size=2, seed=2).epoch_plan(0)
    assert plan(0) != plan(1)
    assert sorted(i for b in plan(0) for i in b) == sorted(i for b in plan(1) for i in b) == list(range(23))


def test_sampler_shards_global_batches_across_ranks():
    manifest = _fake_manifest(BUCKETS)
    ranks = [BucketBatchSampler(manifest, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    # Global batches of 4: ceil(10/4) + ceil(7/4) + ceil(6/4) = 3 + 2 + 2 = 7 steps for both ranks.
    assert len(ranks[0]) == len(ranks[1]) == 7
    for epoch in range(3):
        plan = ranks[0].epoch_plan(epoch)
        per_rank = [s.rank_batches(epoch) for s in ranks]
        for step, global_batch in enumerate(plan):
            assert per_rank[0][step] + per_rank[1][step] == global_batch  # rank r holds slice r
            assert len({manifest.items[i].bucket for i in global_batch}) == 1
            assert all(len(b[step]) == 2 for b in per_rank)
        seen = [i for b in plan for i in b]
        assert set(seen) == set(range(23))  # every image in every epoch
        # Only the short last batch of each bucket is padded: 10 -> +2, 7 -> +1, 6 -> +2 repeats.
        assert len(seen) - 23 == 5
        assert max(Counter(seen).values()) == 2

    single = BucketBatchSampler(manifest, batch_size=4, seed=3)
    # One process: a bucket's short batch is kept short, so nothing repeats.
    seen = [i for b in single.epoch_plan(0) for i in b]
    assert sorted(seen) == list(range(23))


def test_one_process_batch_two_equals_two_processes_batch_one():
    manifest = _fake_manifest([(64, 64)] * 8 + [(80, 48)] * 6)
    one = BucketBatchSampler(manifest, batch_size=2, seed=5)
    two = [BucketBatchSampler(manifest, batch_size=1, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        joined = [a + b for a, b in zip(two[0].rank_batches(epoch), two[1].rank_batches(epoch))]
        assert joined == one.rank_batches(epoch)


def test_sampler_resume_continues_the_same_sequence():
    manifest = _fake_manifest(BUCKETS)
    reference = BucketBatchSampler(manifest, batch_size=3, seed=11, rank=1, world_size=2)
    it = reference.iter_batches()
    steps = len(reference)
    full = [next(it) for _ in range(3 * steps)]
    for cut in (1, steps - 1, steps, steps + 2):
        first = BucketBatchSampler(manifest, batch_size=3, seed=11, rank=1, world_size=2)
        it = first.iter_batches()
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
        resumed = BucketBatchSampler(manifest, batch_size=3, seed=11, rank=1, world_size=2)
        resumed.load_state_dict(state)
        it = resumed.iter_batches()
        assert [next(it) for _ in range(3 * steps - cut)] == full[cut:]

    other = BucketBatchSampler(manifest, batch_size=2, seed=11, rank=1, world_size=2)
    with pytest.raises(ValueError, match="batch_size is 3 but this run has 2"):
        other.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return inspect_model_folder(tiny_model_dir)


LONG_CAPTION = "a photo of a yellow cat sitting on a wooden table, " * 60  # beyond 512 tokens


def _make_folder(root: Path) -> Path:
    folder = root / "imgs"
    _captioned(folder, "a.png", (64, 64), "a red cube", seed=0)
    _captioned(folder, "b.png", (96, 64), "a blue sphere", seed=1)
    _captioned(folder, "c.jpg", (64, 96), "a red cube", seed=2)  # same caption as a.png: encoded once
    _captioned(folder, "d.png", (80, 80), LONG_CAPTION, seed=3)
    (folder / "broken.png").write_bytes(b"")
    (folder / "broken.txt").write_text("never used", encoding="utf-8")
    return folder


def _build(folder: Path, model, out: Path, **kwargs) -> Path:
    kwargs = {"resolution": RES, "text_precision": "fp32", "extra_prompts": ["a validation prompt"]} | kwargs
    return build_dataset(image_dir=folder, model=model, out_dir=out, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("dataset")
    folder = _make_folder(root)
    manifest_path = _build(folder, model, root / "out", repeats=2)
    return folder, manifest_path


def test_build_writes_manifest_caches_and_report(built, model):
    folder, manifest_path = built
    manifest = load_manifest(manifest_path)
    report = load_build_report(manifest_path.parent)
    assert [(it.image, it.caption, it.bucket, it.crop, it.repeats) for it in manifest.items] == [
        ("a.png", "a red cube", (64, 64), (0, 0), 2),
        ("b.png", "a blue sphere", (80, 48), (0, 2), 2),  # 96x64 -> scale 0.8333: 80x53, 2 rows off the top
        ("c.jpg", "a red cube", (48, 80), (2, 0), 2),
        ("d.png", LONG_CAPTION.strip(), (64, 64), (0, 0), 2),
    ]
    assert set(manifest.text_cache) == {"", "a red cube", "a blue sphere", LONG_CAPTION.strip(), "a validation prompt"}
    assert manifest.empty_caption == "" and manifest.extra_prompts == ("a validation prompt",)
    assert manifest.image_path(1) == folder.resolve() / "b.png"
    assert (report.usable_images, report.vae_images_encoded, report.latents_reused) == (4, 4, 0)
    assert (report.prompts_encoded, report.prompts_reused) == (5, 0)  # 3 distinct captions + "" + validation
    assert report.skipped == [{"path": str(folder.resolve() / "broken.png"), "reason": "zero-byte file"}]
    assert report.truncated_captions == [LONG_CAPTION.strip()]
    assert report.buckets == {"48x80": 1, "64x64": 2, "80x48": 1}

    # The cache holds exactly what the encoders give for the same input.
    vae = model_files.load_vae(model, precision="fp32")
    for i in (1, 2):
        item = manifest.items[i]
        plan = plan_crop(item.width, item.height, bucket=item.bucket)
        pixels = load_training_image(manifest.image_path(i), plan=plan)
        expected = flux2.encode_images(vae, pixels[None])
        cached = read_entry(manifest.latent_path(i), kind="latent")[0]["latents"][None]
        assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    encoder = model_files.load_text_encoder(model, precision="fp32")
    tokenizer = model_files.load_tokenizer(model)
    expected = flux2.encode_prompts(encoder, tokenizer, ["", "a blue sphere"])
    assert_close(load_text_embedding(manifest, ""), expected[:1], atol=1e-5, rtol=1e-5)

    batch = load_batch(manifest, [0, 3], dtype=torch.bfloat16)
    assert batch.latents.shape == (2, 128, 4, 4) and batch.latents.dtype == torch.bfloat16
    assert batch.prompt_embeds.shape == (2, 512, 96)
    assert batch.captions == ["a red cube", LONG_CAPTION.strip()] and batch.bucket == (64, 64)
    assert batch.image_paths == [folder.resolve() / "a.png", folder.resolve() / "d.png"]
    one = load_batch(manifest, [1])
    assert_close(one.prompt_embeds, expected[1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="a batch must hold one bucket"):
        load_batch(manifest, [0, 1])
    with pytest.raises(ValueError, match="not in the text cache"):
        load_text_embedding(manifest, "never cached")


def _forbid_encoders(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although everything is cached")

    monkeypatch.setattr(model_files, "load_vae", refuse)
    monkeypatch.setattr(model_files, "load_text_encoder", refuse)


def test_second_build_loads_no_encoder_and_changes_reencode_only_what_changed(tmp_path, model, monkeypatch):
    folder = _make_folder(tmp_path)
    out = tmp_path / "out"
    first = load_manifest(_build(folder, model, out))
    with monkeypatch.context() as m:
        _forbid_encoders(m)
        again = load_manifest(_build(folder, model, out))
    report = load_build_report(out)
    assert (report.vae_images_encoded, report.latents_reused) == (0, 4)
    assert (report.prompts_encoded, report.prompts_reused) == (0, 5)
    assert (report.vae_loaded, report.text_encoder_loaded) == (False, False)
    assert report.truncated_captions == [LONG_CAPTION.strip()]  # remembered from the cache entry
    assert again.fingerprint == first.fingerprint

    _noise_image(folder / "b.png", (96, 64), seed=99)  # new pixels, same size and caption
    (folder / "a.txt").write_text("a green cube", encoding="utf-8")
    changed = load_manifest(_build(folder, model, out))
    report = load_build_report(out)
    assert (report.vae_images_encoded, report.latents_reused) == (1, 3)
    assert (report.prompts_encoded, report.prompts_reused) == (1, 5)  # "a red cube" is still c.jpg's caption
    assert changed.fingerprint != first.fingerprint
    assert changed.items[1].latent != first.items[1].latent and changed.items[0].latent == first.items[0].latent


def test_damaged_cache_files_are_rebuilt_never_loaded(tmp_path, model):
    folder = _make_folder(tmp_path)
    out = tmp_path / "out"
    manifest = load_manifest(_build(folder, model, out))
    latent = manifest.latent_path(0)
    latent.write_bytes(latent.read_bytes()[:-100])  # truncated
    text = manifest.text_path("a blue sphere")
    raw = bytearray(text.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit in the data: only the checksum notices
    text.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="unreadable .truncated or corrupt.*Rebuild the dataset"):
        load_batch(manifest, [0])
    with pytest.raises(ValueError, match="fails its checksum"):
        load_text_embedding(manifest, "a blue sphere")

    _build(folder, model, out)
    report = load_build_report(out)
    assert sorted(report.rebuilt_cache_files) == sorted([str(latent), str(text)])
    assert (report.vae_images_encoded, report.prompts_encoded) == (1, 1)
    read_entry(latent, kind="latent")
    read_entry(text, kind="text")

    latent.unlink()
    with pytest.raises(ValueError, match="1 cache files are missing"):
        load_manifest(manifest.path)


def test_vae_is_released_before_the_text_encoder_loads(tmp_path, model, monkeypatch):
    folder = _make_folder(tmp_path)
    refs, order = [], []
    real_vae, real_text = model_files.load_vae, model_files.load_text_encoder

    def load_vae(*args, **kwargs):
        vae = real_vae(*args, **kwargs)
        refs.append(weakref.ref(vae))
        order.append("vae")
        return vae

    def load_text_encoder(*args, **kwargs):
        order.append("text" if refs[0]() is None else "text while the VAE is alive")
        return real_text(*args, **kwargs)

    monkeypatch.setattr(model_files, "load_vae", load_vae)
    monkeypatch.setattr(model_files, "load_text_encoder", load_text_encoder)
    _build(folder, model, tmp_path / "out", vae_batch_size=1, text_batch_size=2)
    assert order == ["vae", "text"]
    report = load_build_report(tmp_path / "out")
    assert (report.vae_images_encoded, report.prompts_encoded) == (4, 5)


def test_build_refuses_bad_arguments(tmp_path, model):
    folder = _make_folder(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    message = f"dataset output folder (out_dir) {blocker / 'out'} is not a writable folder"
    with pytest.raises(ValueError, match=re.escape(message)):
        _build(folder, model, blocker / "out")
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not a writable folder"):
            _build(folder, model, locked / "out")
    with pytest.raises(ValueError, match="is the image folder itself"):
        _build(folder, model, folder)
    inside = load_manifest(_build(folder, model, folder / "cache"))  # a subfolder is left out of the scan
    assert len(inside.items) == 4 and load_build_report(folder / "cache").skipped[0]["reason"] == "zero-byte file"
    with pytest.raises(ValueError, match="resolution 100 must be a multiple of 16"):
        _build(folder, model, tmp_path / "o", resolution=100)
    with pytest.raises(ValueError, match="repeats 0 must be an integer >= 1"):
        _build(folder, model, tmp_path / "o", repeats=0)
    with pytest.raises(ValueError, match="extra_prompts must be a list of strings"):
        _build(folder, model, tmp_path / "o", extra_prompts="one prompt")
    with pytest.raises(ValueError, match="vae_precision 'fp8' is not one of bf16, fp16, fp32"):
        _build(folder, model, tmp_path / "o", vae_precision="fp8")


def test_manifest_checks(built, tmp_path):
    _, manifest_path = built
    content = json.loads(manifest_path.read_text(encoding="utf-8"))
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(content | {"version": 99}), encoding="utf-8")
    with pytest.raises(ValueError, match="version 99, this trainer reads versions 1 to 3"):
        load_manifest(bad)
    escaped = content | {"text_cache": content["text_cache"] | {"x": "../../etc/passwd"}}
    bad.write_text(json.dumps(escaped), encoding="utf-8")
    with pytest.raises(ValueError, match="points outside the dataset folder"):
        load_manifest(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_manifest(tmp_path / "nothing.json")
    assert load_manifest(manifest_path.parent).path == manifest_path.resolve()  # a dataset folder works too


def test_cli_build_dataset_prints_summary(built, tiny_model_dir, capsys, monkeypatch):
    from flux2_lora_pack.trainer.__main__ import main

    folder, manifest_path = built
    _forbid_encoders(monkeypatch)  # the fixture's build filled the caches
    rc = main(["build-dataset", "--images", str(folder), "--model", str(tiny_model_dir), "--out",
               str(manifest_path.parent), "--resolution", str(RES), "--repeats", "2", "--text-precision", "fp32",
               "--prompt", "a validation prompt"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "4 usable images in 3 buckets (48x80: 1, 64x64: 2, 80x48: 1); 1 skipped." in out
    assert f"skipped {folder.resolve() / 'broken.png'}: zero-byte file" in out
    assert "latents: 0 encoded, 4 reused; captions: 0 encoded, 5 reused." in out
