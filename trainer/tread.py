"""TREAD token routing for FLUX.2 training: image tokens skip a window of blocks and rejoin after it.

A route covers blocks start..end (both inclusive, counted over the double blocks first, then the single
blocks, as SimpleTuner counts them; a route may span the double/single boundary). In training, when the
route starts, each sample keeps a random subset of its target image tokens; `selection_ratio` is the
fraction routed AROUND the route (SimpleTuner's code uses it that way, as its router's mask_ratio; its
FLUX.2 quickstart calls it the fraction kept). The kept tokens run through the route's blocks with their
own RoPE rows (each sample its own rows, so the attention processors get a (B, S, D) rotary table: see
blocks.RoutedAttnProcessor); the routed-around tokens keep their activations from the route's start,
and every token is back in its place when the route ends. Text tokens always go through. Reference-image
tokens (edit LoRAs: image tokens after num_target_tokens) are never routed around: they condition the
target tokens and there are few of them.

The selection is a pure function of the per-sample generators of objective.sample_generators, drawn
after prepare_batch has used them: the same (seed, step, sample) routes the same tokens whatever the
number of processes, and a resumed run routes like an uninterrupted one. Validation and sampling
(module in eval mode) never route.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import TreadConfig

log = logging.getLogger(__name__)

HIGH_RATIO = 0.5
"""Above this selection_ratio most image tokens skip the route; the TREAD paper used 0.5."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Route:
    """One resolved routing window."""

    start: int
    """First routed block, inclusive, in [0, num_blocks): double blocks first, then single blocks."""
    end: int
    """Last routed block, inclusive."""
    selection_ratio: float
    """Fraction of each sample's target image tokens that skips the blocks start..end."""


def plan_routes(config: TreadConfig, *, num_blocks: int) -> tuple[Route, ...]:
    """The config's routes as block indices of a model with num_blocks blocks, ordered by start.

    Raises ValueError (naming tread_config) for routes outside the model or overlapping; warns for a
    selection_ratio above 0.5.
    """
    routes = tuple(
        sorted(
            (Route(start=start, end=end, selection_ratio=ratio)
             for ratio, start, end in config.resolved_routes(num_blocks)),
            key=lambda r: r.start,
        )
    )
    for route in routes:
        if route.selection_ratio > HIGH_RATIO:
            log.warning(
                "tread_config: selection_ratio %.2f routes %.0f%% of the image tokens around blocks %d..%d "
                "(the fraction SKIPPED, as SimpleTuner's code uses it); above %.1f training signal per step "
                "drops quickly.", route.selection_ratio, 100 * route.selection_ratio, route.start, route.end,
                HIGH_RATIO,
            )
    return routes


def kept_count(num_tokens: int, *, selection_ratio: float) -> int:
    """Tokens that go through a route: num_tokens - floor(num_tokens * selection_ratio), at least 1 for ratio < 1."""
    return num_tokens - int(num_tokens * selection_ratio)


def select_tokens(num_tokens: int, *, selection_ratio: float, generators: list[torch.Generator]) -> Tensor:
    """(B, K) int64 ascending indices of the tokens that go through, one random subset per sample.

    Sample b draws from generators[b] only (a CPU generator), so its subset depends on nothing else in the
    batch. K = kept_count(num_tokens, selection_ratio=...) is the same for every sample.
    """
    if not 0.0 <= selection_ratio < 1.0:
        raise ValueError(f"selection_ratio must be in [0, 1), got {selection_ratio!r}.")
    if num_tokens < 1 or not generators:
        raise ValueError(f"select_tokens needs num_tokens >= 1 and one generator per sample, got "
                         f"{num_tokens} tokens and {len(generators)} generators.")
    keep = kept_count(num_tokens, selection_ratio=selection_ratio)
    rows = [torch.randperm(num_tokens, generator=g)[:keep].sort().values for g in generators]
    return torch.stack(rows)


@dataclass(frozen=True, kw_only=True, slots=True)
class Routing:
    """The routes of one forward with the tokens each sample keeps on each of them."""

    routes: tuple[Route, ...]
    kept: tuple[Tensor, ...]
    """Per route, (B, K) ascending indices into the image tokens (targets, then references)."""

    def route_starting_at(self, block: int) -> int | None:
        return next((i for i, r in enumerate(self.routes) if r.start == block), None)

    def route_ending_at(self, block: int) -> int | None:
        return next((i for i, r in enumerate(self.routes) if r.end == block), None)


def draw_routing(routes: tuple[Route, ...], *, num_target_tokens: int, num_image_tokens: int,
                 generators: list[torch.Generator]) -> Routing:
    """Draw every route's kept tokens, route by route, from each sample's generator.

    Target tokens are [0, num_target_tokens); the image tokens after them (reference images) are always kept.
    """
    if not 1 <= num_target_tokens <= num_image_tokens:
        raise ValueError(f"num_target_tokens {num_target_tokens} must be in [1, {num_image_tokens}] (the image tokens).")
    references = torch.arange(num_target_tokens, num_image_tokens).expand(len(generators), -1)
    kept = []
    for route in routes:
        chosen = select_tokens(num_target_tokens, selection_ratio=route.selection_ratio, generators=generators)
        kept.append(torch.cat([chosen, references], dim=1))
    return Routing(routes=routes, kept=tuple(kept))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """(B, N, D) tokens, (B, K) indices -> (B, K, D): each sample's rows at its indices."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(full: Tensor, kept: Tensor, index: Tensor) -> Tensor:
    """full (B, N, D) with rows index (B, K) replaced by kept (B, K, D); a new tensor, differentiable in both."""
    return torch.scatter(full, 1, index.unsqueeze(-1).expand(-1, -1, full.shape[-1]), kept.to(full.dtype))


def gather_rotary_rows(table: Tensor, index: Tensor, *, num_text: int) -> Tensor:
    """Rotary table (T + N, D) -> (B, T + K, D): the T text rows, then each sample's kept image rows."""
    text = table[:num_text].unsqueeze(0).expand(index.shape[0], -1, -1)
    image = table[num_text:][index]
    return torch.cat([text, image], dim=1)

