"""Offset noise on FLUX.2's flow-matching noise: its settings and the per-sample draw.

SimpleTuner's offset_noise adds noise_offset * n to the noise, n ~ N(0, 1) one value per latent channel, so the
model also learns to move an image's mean (very dark or light images). SimpleTuner applies it only to epsilon and
v-prediction models and skips it for flow matching; here it acts on the flow-matching noise e, so x_t and the
target e - x0 both carry it. Each sample decides with its own draw (SimpleTuner draws once per batch): the same
expected share, and 1 x batch 2 stays equal to 2 x batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .settings import check_fields, setting

_DRAW_SALT = 0x0FF5E7  # derives the offset generator from a sample's own: the other draws do not move


@dataclass(frozen=True, kw_only=True, slots=True)
class NoiseOffsetConfig:
    enabled: bool = setting("offset_noise", False)
    """Add offset noise (SimpleTuner's switch; noise_offset sets its strength)."""
    strength: float = setting("noise_offset", 0.1, ge=0, le=1)
    """Scale of the per-channel offset added to the noise: 0.05-0.1 is usual. In [0, 1]."""
    probability: float = setting("noise_offset_probability", 0.25, ge=0, le=1)
    """Chance per sample that its noise gets the offset. In [0, 1]."""

    def __post_init__(self) -> None:
        check_fields(self)

    def apply(self, noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """noise (B, C, h, w) with the offset added to the samples that draw it; noise itself when off."""
        if not self.enabled or self.strength == 0 or self.probability == 0:
            return noise
        offsets = []
        for generator in generators:
            own = torch.Generator().manual_seed((generator.initial_seed() ^ _DRAW_SALT) % (2**63 - 1))
            picked = torch.rand(1, generator=own).item() < self.probability
            channel = torch.randn(noise.shape[1], 1, 1, generator=own)
            offsets.append(channel * self.strength if picked else torch.zeros_like(channel))
        return noise + torch.stack(offsets).to(noise.dtype)

    def unused_settings(self, changed: set[str]) -> list[tuple[str, str]]:
        """(key, why) for each changed setting that has no effect (TrainConfig warns)."""
        if self.enabled:
            return []
        return [(k, "offset_noise is false") for k in ("noise_offset", "noise_offset_probability") if k in changed]
