"""TREAD for FLUX.2 training: route planning, token selection and the routed attention processors.

A route covers blocks start..end (both inclusive, counted over the double blocks first, then the single
blocks, as SimpleTuner counts them; a route may span the double/single boundary). In training, when the
route starts, each sample keeps a random subset of its target image tokens; `selection_ratio` is the
fraction routed AROUND the route (SimpleTuner's code uses it that way, as its router's mask_ratio; its
FLUX.2 quickstart calls it the fraction kept). The kept tokens run through the route's blocks with their
own RoPE rows (each sample its own rows, so the attention processors get a (B, S, D) rotary table:
RoutedAttnProcessor, RoutedParallelSelfAttnProcessor); the routed-around tokens keep their activations from
the route's start, and every token is back in its place when the route ends. Text tokens always go through.
Reference-image tokens (edit LoRAs: image tokens after num_target_tokens) are never routed around: they
condition the target tokens and there are few of them.

The selection is a pure function of the per-sample generators of objective.sample_generators, drawn
after prepare_batch has used them: the same (seed, step, sample) routes the same tokens whatever the
number of processes, and a resumed run routes like an uninterrupted one. Validation and sampling
(module in eval mode) never route.

The block loop that applies a Routing lives in blocks.block_forward (it also does checkpointing and reference
modulation); it calls enter_route and leave_route here. The settings (TreadConfig, SimpleTuner's tread_config)
live here too; this module imports only trainer.settings, so config.py and blocks.py import it without a cycle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .settings import closest


log = logging.getLogger(__name__)

HIGH_RATIO = 0.5
"""Above this selection_ratio most image tokens skip the route; the TREAD paper used 0.5."""

# ------------------------------------------------------------------------------------------- settings



@dataclass(frozen=True, kw_only=True, slots=True)
class TreadRoute:
    """One TREAD routing window, as SimpleTuner spells it in tread_config.routes."""

    selection_ratio: float
    """Fraction of the image tokens routed around (dropped from) the blocks of this window; the rest go
    through them. 0.5 keeps half. SimpleTuner's code uses the value this way (its router's mask_ratio),
    although its FLUX.2 quickstart calls it the fraction kept. In [0, 1)."""
    start_layer_idx: int
    """First routed block, inclusive. Blocks are counted over double blocks first, then single blocks
    (56 on FLUX.2-dev); a negative index counts from the end (-1 = the last block)."""
    end_layer_idx: int
    """Last routed block, inclusive, counted like start_layer_idx."""

    def __post_init__(self) -> None:
        # Direct construction gets the same checks as JSON; the dotted name comes from TreadConfig.
        _check_route(self, where="tread_config.routes[?]")

    def resolve(self, num_layers: int) -> tuple[int, int]:
        """(start, end) as non-negative block indices, both inclusive, for a model with num_layers blocks."""
        start = self.start_layer_idx + num_layers if self.start_layer_idx < 0 else self.start_layer_idx
        end = self.end_layer_idx + num_layers if self.end_layer_idx < 0 else self.end_layer_idx
        return start, end


def _check_route(route: TreadRoute, *, where: str) -> None:
    ratio = route.selection_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"{where}.selection_ratio must be a number in [0, 1), got {ratio!r}.")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"{where}.selection_ratio must be in [0, 1) (the fraction of image tokens routed around the "
            f"blocks), got {ratio!r}; 0.5 keeps half the tokens."
        )
    object.__setattr__(route, "selection_ratio", float(ratio))
    for name in ("start_layer_idx", "end_layer_idx"):
        value = getattr(route, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{name} must be a whole number (negative counts from the end), got {value!r}.")
    start, end = route.start_layer_idx, route.end_layer_idx
    # With mixed signs the order depends on the model's block count; resolve() checks it then.
    if (start >= 0) == (end >= 0) and start > end:
        raise ValueError(
            f"{where}: start_layer_idx {start} is after end_layer_idx {end}; both are inclusive block indices."
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TreadConfig:
    """TREAD token routing (training only): image tokens skip the routed blocks and rejoin after them."""

    routes: tuple[TreadRoute, ...]
    """The routing windows; at most one may cover any block."""

    def __post_init__(self) -> None:
        if not isinstance(self.routes, tuple) or not self.routes:
            raise ValueError("tread_config.routes must be a non-empty list of routes; remove tread_config to disable TREAD.")
        for i, route in enumerate(self.routes):
            if not isinstance(route, TreadRoute):
                raise ValueError(f"tread_config.routes[{i}] must be a route object, got {route!r}.")

    @classmethod
    def from_dict(cls, data: Any) -> TreadConfig:
        """Parse SimpleTuner's {"routes": [{"selection_ratio", "start_layer_idx", "end_layer_idx"}, ...]}."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tread_config is a string that is not valid JSON: {exc}.") from exc
        if not isinstance(data, dict):
            raise ValueError(f'tread_config must be an object like {{"routes": [...]}}, got {data!r}.')
        extra = sorted(set(data) - {"routes"})
        if extra:
            raise ValueError(f"tread_config has unknown key(s) {extra}; the only key is 'routes'.")
        if "routes" not in data:
            raise ValueError("tread_config needs 'routes': a list of {selection_ratio, start_layer_idx, end_layer_idx}.")
        routes = data["routes"]
        if not isinstance(routes, list) or not routes:
            raise ValueError(f"tread_config.routes must be a non-empty list, got {routes!r}.")
        keys = [f.name for f in dataclasses.fields(TreadRoute)]
        parsed = []
        for i, raw in enumerate(routes):
            where = f"tread_config.routes[{i}]"
            if not isinstance(raw, dict):
                raise ValueError(f"{where} must be an object with {keys}, got {raw!r}.")
            unknown = sorted(set(raw) - set(keys))
            if unknown:
                raise ValueError(f"{where} has unknown key(s) {unknown}{closest(unknown[0], keys)} Route keys are {keys}.")
            missing = [k for k in keys if k not in raw]
            if missing:
                raise ValueError(f"{where} is missing {missing}; each route needs {keys}.")
            try:
                parsed.append(TreadRoute(**raw))
            except ValueError as exc:
                raise ValueError(str(exc).replace("tread_config.routes[?]", where)) from None
        return cls(routes=tuple(parsed))

    def to_dict(self) -> dict[str, Any]:
        return {"routes": [dataclasses.asdict(r) for r in self.routes]}

    def resolved_routes(self, num_layers: int) -> tuple[tuple[float, int, int], ...]:
        """(selection_ratio, start, end) per route with indices in [0, num_layers), ends inclusive.

        Raises ValueError when a route falls outside the model or two routes share a block (SimpleTuner
        silently uses the first matching route for such a block).
        """
        resolved = []
        for i, route in enumerate(self.routes):
            start, end = route.resolve(num_layers)
            if not (0 <= start <= end < num_layers):
                raise ValueError(
                    f"tread_config.routes[{i}]: blocks {route.start_layer_idx}..{route.end_layer_idx} resolve to "
                    f"{start}..{end}, outside this model's {num_layers} blocks or in the wrong order."
                )
            resolved.append((route.selection_ratio, start, end))
        ordered = sorted(resolved, key=lambda r: r[1])
        for a, b in zip(ordered, ordered[1:]):
            if b[1] <= a[2]:
                raise ValueError(f"tread_config routes overlap: blocks {a[1]}..{a[2]} and {b[1]}..{b[2]}; "
                                 "give each block to one route.")
        return tuple(resolved)


# ------------------------------------------------------------------------------------------- planning


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

    Raises ValueError (naming tread_config) for routes outside the model or overlapping (SimpleTuner
    silently uses the first matching route for such a block); warns for a selection_ratio above 0.5.
    """
    routes = tuple(sorted((Route(start=start, end=end, selection_ratio=ratio)
                           for ratio, start, end in config.resolved_routes(num_blocks)), key=lambda r: r.start))
    for route in routes:
        if route.selection_ratio > HIGH_RATIO:
            log.warning(
                "tread_config: selection_ratio %.2f routes %.0f%% of the image tokens around blocks %d..%d "
                "(the fraction SKIPPED, as SimpleTuner's code uses it); above %.1f training signal per step "
                "drops quickly.", route.selection_ratio, 100 * route.selection_ratio, route.start, route.end,
                HIGH_RATIO,
            )
    return routes


# ------------------------------------------------------------------------------------------ selection


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



@dataclass(frozen=True, kw_only=True, slots=True)
class Detour:
    """A route in progress inside one forward (enter_route's result, given back to leave_route)."""

    before: Tensor
    """(B, N, D) image tokens at the route's start: the routed-around tokens leave the route with these."""
    index: Tensor
    """(B, K) the image tokens that go through the route, on the tokens' device."""


def enter_route(image: Tensor, *, kept: Tensor, rotary: tuple[Tensor, Tensor],
                num_text: int) -> tuple[Tensor, tuple[Tensor, Tensor], Detour]:
    """At a route's start: (the kept image tokens (B, K, D), their per-sample rotary tables (B, T + K, D), the
    Detour that leave_route needs). kept: the route's (B, K) row of Routing.kept; rotary: the full (T + N, D)
    (cos, sin) tables."""
    index = kept.to(image.device)
    tables = tuple(gather_rotary_rows(table, index, num_text=num_text) for table in rotary)
    return gather_tokens(image, index), tables, Detour(before=image, index=index)


def leave_route(detour: Detour, image: Tensor) -> Tensor:
    """At a route's end: every image token back in its place, the kept ones with their new activations."""
    return scatter_tokens(detour.before, image, detour.index)


# ------------------------------------------------------------------------------ routed attention


def apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE on x (B, S, H, D) with cos/sin of (S, D) (shared) or (B, S, D) (one table per sample).

    The arithmetic of diffusers' apply_rotary_emb(use_real=True, unbind -1): pairs (x0, x1) -> (-x1, x0),
    in float32.
    """
    cos, sin = rotary
    if cos.ndim == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2).to(x.device), sin.unsqueeze(2).to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RoutedAttnProcessor:
    """Flux2AttnProcessor's computation, accepting a per-sample (B, S, D) rotary table.

    diffusers' processor broadcasts an (S, D) table over the batch only; a TREAD route gives every sample
    its own kept tokens and so its own RoPE rows. Installed on the double blocks of TREAD routes.
    """

    # diffusers' dispatch reads these from the processor (set_attention_backend writes the first).
    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if getattr(attn, "fused_projections", False):
            raise RuntimeError("RoutedAttnProcessor does not support fused q/k/v projections; unfuse them.")
        heads = (-1, attn.head_dim)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        value = attn.to_v(hidden_states).unflatten(-1, heads)
        if encoder_hidden_states is not None:
            # Text first, as diffusers orders the joint sequence (and the rotary table).
            query = torch.cat([attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads)), query], 1)
            key = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads)), key], 1)
            value = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads), value], 1)
        if image_rotary_emb is not None:
            query, key = apply_rotary(query, image_rotary_emb), apply_rotary(key, image_rotary_emb)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        num_text = encoder_hidden_states.shape[1]
        text, image = out[:, :num_text], out[:, num_text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


class RoutedParallelSelfAttnProcessor:
    """Flux2ParallelSelfAttnProcessor's computation (single blocks), accepting a (B, S, D) rotary table."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: Any, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        projected = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = projected.split([3 * attn.inner_dim, projected.shape[-1] - 3 * attn.inner_dim], dim=-1)
        heads = (-1, attn.head_dim)
        query, key, value = (t.unflatten(-1, heads) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = apply_rotary(query, image_rotary_emb), apply_rotary(key, image_rotary_emb)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def apply_routed_processors(transformer: torch.nn.Module, *, routes: tuple[Route, ...]) -> None:
    """Install RoutedAttnProcessor / RoutedParallelSelfAttnProcessor on every block of the routes.

    They compute what diffusers' processors compute (same parameters, so the state dict does not change) and
    also take the per-sample rotary tables a route gives; blocks outside the routes keep diffusers' processors.
    """
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    num_double = len(transformer.transformer_blocks)
    for route in routes:
        if not 0 <= route.start <= route.end < len(blocks):
            raise ValueError(f"TREAD route {route.start}..{route.end} is outside the model's {len(blocks)} blocks.")
        for i in range(route.start, route.end + 1):
            processor = RoutedAttnProcessor() if i < num_double else RoutedParallelSelfAttnProcessor()
            # Keep an attention backend chosen earlier (diffusers' set_attention_backend stores it on the processor).
            processor._attention_backend = getattr(blocks[i].attn.processor, "_attention_backend", None)
            blocks[i].attn.set_processor(processor)
