"""Captions of training images: the caption strategies and reading same-name .txt caption files.

textfile reads the image's same-name .txt (each non-empty line a caption of its own unless the split is
off), filename turns the file name into the caption, instanceprompt gives every image one caption.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]
CAPTION_STRATEGIES: tuple[str, ...] = ("textfile", "filename", "instanceprompt")


def check_caption_args(caption_strategy: str, instance_prompt: str | None) -> list[str]:
    """Refuse an unknown strategy or instanceprompt without a prompt; the warnings for an ignored prompt."""
    if caption_strategy not in CAPTION_STRATEGIES:
        raise ValueError(
            f"caption_strategy {caption_strategy!r} is not one of {', '.join(CAPTION_STRATEGIES)}: textfile reads "
            "same-name .txt files, filename uses the file name, instanceprompt uses instance_prompt for every image."
        )
    if caption_strategy == "instanceprompt" and not (instance_prompt or "").strip():
        raise ValueError(
            "caption_strategy 'instanceprompt' needs a non-empty instance_prompt (the caption used for every "
            "image, e.g. 'a photo of sks dog')."
        )
    if caption_strategy != "instanceprompt" and instance_prompt:
        msg = f"instance_prompt {instance_prompt!r} is ignored with caption_strategy {caption_strategy!r}"
        log.warning(msg)
        return [msg]
    return []


def find_caption_file(image: Path) -> Path | None:
    """The image's same-name .txt (any of the usual spellings of the suffix), or None."""
    for suffix in (".txt", ".TXT", ".Txt"):
        candidate = image.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def split_caption_lines(text: str) -> tuple[str, ...]:
    """Each non-empty line of a caption file, stripped (\\r of Windows line ends included); ("",) for none."""
    lines = tuple(line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line) or ("",)


def captions_for(
    image: Path, *, caption_strategy: str, instance_prompt: str | None, disable_multiline_split: bool = False
) -> tuple[tuple[str, ...] | None, str | None]:
    """(captions, None) or (None, the reason the image is skipped)."""
    if caption_strategy == "instanceprompt":
        return (str(instance_prompt).strip(),), None
    if caption_strategy == "filename":
        return (" ".join(image.stem.replace("_", " ").split()),), None
    caption_file = find_caption_file(image)
    if caption_file is None:
        return None, (
            f"missing caption: no {image.with_suffix('.txt').name} next to it; add one, or use caption_strategy "
            "filename or instanceprompt"
        )
    try:
        raw = caption_file.read_bytes()
    except OSError as exc:
        return None, f"caption file {caption_file.name} is unreadable ({exc.strerror or exc})"
    try:
        # utf-8-sig: Windows editors often prepend a byte-order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, (
            f"caption file {caption_file.name} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8"
        )
    return ((text.strip(),) if disable_multiline_split else split_caption_lines(text)), None
