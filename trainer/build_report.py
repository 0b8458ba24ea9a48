"""The report of a dataset build (out_dir/report.json): what was found, used and skipped, and cache reuse."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cache import atomic_write_bytes

REPORT_FILE = "report.json"


@dataclass(kw_only=True, slots=True)
class BuildReport:
    """What a build did; saved as out_dir/report.json. The counters prove cache reuse in tests.

    The top-level fields total over all datasets; `datasets` holds one entry per dataset id with what was
    found, used and skipped (each with its reason), its buckets, caption length statistics, cache hits and
    the latent cache's bytes per image.
    """

    image_dir: str
    out_dir: str
    usable_images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    vae_images_encoded: int = 0
    latents_reused: int = 0
    prompts_encoded: int = 0
    prompts_reused: int = 0
    truncated_captions: list[str] = field(default_factory=list)
    rebuilt_cache_files: list[str] = field(default_factory=list)
    vae_loaded: bool = False
    text_encoder_loaded: bool = False
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled_datasets: list[str] = field(default_factory=list)
    latent_bytes_per_image: float = 0.0
    text_bytes_per_caption: float = 0.0
    captions: int = 0
    """Training captions of all usable images (an image with a multi-line caption file counts each line)."""
    multi_caption_images: int = 0
    """Usable images with several captions (one is drawn per sample)."""

    @property
    def cache_hit_rate(self) -> float:
        """Share of latents and caption embeddings that came from the cache (1.0 when nothing was needed)."""
        total = self.vae_images_encoded + self.latents_reused + self.prompts_encoded + self.prompts_reused
        return 1.0 if total == 0 else (self.latents_reused + self.prompts_reused) / total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.usable_images} usable images in {len(self.buckets)} buckets "
            f"({', '.join(f'{b}: {n}' for b, n in self.buckets.items())}); {len(self.skipped)} skipped.",
            f"latents: {self.vae_images_encoded} encoded, {self.latents_reused} reused; "
            f"captions: {self.prompts_encoded} encoded, {self.prompts_reused} reused.",
        ]
        if self.multi_caption_images:
            several = "1 image has" if self.multi_caption_images == 1 else f"{self.multi_caption_images} images have"
            lines.append(f"{self.captions} training captions; {several} several "
                         "(one line of the caption file is drawn per sample).")
        if len(self.datasets) > 1 or any(d.get("type") == "conditioning" for d in self.datasets.values()):
            lines += [_dataset_line(ds, info) for ds, info in self.datasets.items()]
        lines.append(
            f"cache hit rate {self.cache_hit_rate:.0%}; {self.latent_bytes_per_image:.0f} latent bytes per image, "
            f"{self.text_bytes_per_caption:.0f} text bytes per caption."
        )
        for d in self.disabled_datasets:
            lines.append(f"dataset {d}: disabled, not built")
        lines += [f"skipped {s['path']}: {s['reason']}" for s in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"rebuilt damaged cache file {p}" for p in self.rebuilt_cache_files]
        return "\n".join(lines)


def _dataset_line(ds: str, info: dict[str, Any]) -> str:
    buckets = ", ".join(f"{b}: {n}" for b, n in info["buckets"].items())
    weight = info.get("probability", 1.0)
    return (
        f"dataset {ds} ({info['type']}): {info['found']} found, {info['used']} used, "
        f"{len(info['skipped'])} skipped; x{info['copies']} per epoch; "
        + (f"probability {weight:g}; " if weight != 1.0 else "")
        + f"buckets {buckets or 'none'}; {info['latent_bytes_per_image']:.0f} latent bytes per image"
    )


def dataset_entry(kind: str, folder: Path, copies: int, *, probability: float = 1.0) -> dict[str, Any]:
    """A fresh BuildReport.datasets entry for one dataset."""
    return {"type": kind, "folder": str(folder), "found": 0, "used": 0, "skipped": [], "buckets": {},
            "copies": copies, "probability": probability, "caption_words": {}, "captions": 0,
            "images_with_several_captions": 0, "latents_encoded": 0, "latents_reused": 0,
            "latent_bytes_per_image": 0.0}


def load_build_report(path: str | Path) -> BuildReport:
    """The report.json of a build (path to the file or to the dataset folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    return BuildReport(**json.loads(path.read_text(encoding="utf-8")))


def write_build_report(report: BuildReport, out: Path) -> None:
    """Save report as out/report.json (atomically)."""
    data = report.to_dict()
    atomic_write_bytes(out / REPORT_FILE, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))
