"""SimpleTuner's image-size keys on the FLUX.2 quickstart's own dataset entry: large images are kept and brought
down to their bucket, never skipped; target_downsample_size (with maximum_image_size and crop) cuts the bucket
from the image at that size. Expected sizes are SimpleTuner's own (helpers/image_manipulation/training_sample.py
at FLUX.2's 16-pixel alignment): 2048x2048 -> 1024x1024; 4000x3000 -> 1024x1024 square crop from a 1365x1024
resize at left 170, or the 1184x880 bucket without crop."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux2_lora_pack.trainer.build import plan_for, size_limit_reason
from flux2_lora_pack.trainer.databackend import parse_backend_config
from flux2_lora_pack.trainer.scan import ScannedImage

QUICKSTART_ENTRY = {  # documentation/quickstart/FLUX2.md's multidatabackend.json, first entry, verbatim
    "id": "my-dataset", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
    "resolution": 1024, "minimum_image_size": 1024, "maximum_image_size": 1024, "resolution_type": "pixel_area",
    "cache_dir_vae": "cache/vae/flux2/my-dataset", "instance_data_dir": "datasets/my-dataset",
    "caption_strategy": "textfile", "metadata_backend": "discovery", "repeats": 10,
}


def _spec(tmp_path: Path, **changes):
    (tmp_path / "datasets" / "my-dataset").mkdir(parents=True, exist_ok=True)
    config = parse_backend_config([QUICKSTART_ENTRY | changes], base_dir=tmp_path)
    return config.datasets[0], config.warnings


def _image(width: int, height: int) -> ScannedImage:
    return ScannedImage(path=Path(f"/x/{width}x{height}.png"), relpath=f"{width}x{height}.png", captions=("a photo",),
                        width=width, height=height, sha256=f"{width}x{height}")


@pytest.mark.parametrize("downsample", [None, 1024])
def test_the_quickstart_dataset_keeps_large_photos_at_simpletuners_sizes(tmp_path, downsample):
    spec, warnings = _spec(tmp_path, **({} if downsample is None else {"target_downsample_size": downsample}))
    assert warnings == ()
    square, photo = _image(2048, 2048), _image(4000, 3000)
    assert size_limit_reason(square, spec) is None and size_limit_reason(photo, spec) is None  # kept
    plan = plan_for(square, spec, step=16)
    assert (plan.bucket, plan.resized, plan.crop) == ((1024, 1024), (1024, 1024), (0, 0))
    plan = plan_for(photo, spec, step=16)
    assert (plan.bucket, plan.resized, plan.crop) == ((1024, 1024), (1365, 1024), (170, 0))
    # the minimum still skips: 1000x1000 is under 1024 (pixel_area)
    assert size_limit_reason(_image(1000, 1000), spec).startswith("too small: 1000x1000")


def test_without_crop_a_large_photo_takes_its_aspect_bucket(tmp_path):
    spec, _ = _spec(tmp_path, crop=False)
    plan = plan_for(_image(4000, 3000), spec, step=16)
    assert (plan.bucket, plan.resized) == ((1184, 880), (1184, 888))  # 8 rows of rounding are cropped


def test_a_larger_target_downsample_size_crops_the_bucket_from_a_larger_image(tmp_path):
    spec, _ = _spec(tmp_path, target_downsample_size=2048)
    plan = plan_for(_image(4000, 3000), spec, step=16)
    # 4000x3000 scaled to 2048^2 pixels (x0.5912): the 1024 square is the centre of a 2365x1774 image
    assert plan.bucket == (1024, 1024) and plan.resized == (2365, 1774)
    assert plan.crop == ((2365 - 1024) // 2, (1774 - 1024) // 2)
    # switched off (no maximum_image_size: SimpleTuner then ignores it too), the whole photo is resized down
    spec, warnings = _spec(tmp_path, target_downsample_size=2048, maximum_image_size=None)
    assert plan_for(_image(4000, 3000), spec, step=16).resized == (1365, 1024)
    assert warnings == ("dataset 'my-dataset': target_downsample_size takes effect only with crop true and "
                        "maximum_image_size set (as in SimpleTuner); it is not used here",)


def test_target_downsample_size_never_goes_below_what_covers_the_bucket(tmp_path):
    spec, _ = _spec(tmp_path, target_downsample_size=512)  # smaller than the bucket: the cover wins
    plan = plan_for(_image(4000, 3000), spec, step=16)
    assert plan.resized == (1365, 1024)
