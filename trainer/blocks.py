"""Our FLUX.2 transformer forward for training: diffusers' Flux2Transformer2DModel.forward, block by block.

`block_forward` computes what Flux2Transformer2DModel.forward computes without its KV-cache modes
(embeddings, modulation, rotary table from the ids, double blocks, concat, single blocks, norm_out,
proj_out), calling the model's own submodules: PEFT LoRA layers, FSDP2-sharded blocks and hooks on
them all apply. Owning the block loop is what lets it add:

- gradient checkpointing of every N-th block (torch.utils.checkpoint, non-reentrant);
- TREAD (trainer/tread.py): routed image tokens skip windows of blocks, each sample with its own RoPE rows.

`apply_block_forward` makes a transformer's own forward run `block_forward`, the way FSDP2's fully_shard
changes a module's class: the module stays the same object (same state-dict keys, same `inner`), so
FSDP2's root hooks, DDP and hooks added later (group offload) wrap it as before. Apply it after LoRA and
before FSDP2/DDP and hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import tread

# ------------------------------------------------------------------------------------------- rotary


def rotary_table(transformer: torch.nn.Module, *, img_ids: Tensor, txt_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T + N, head_dim): text rows, then image rows, as diffusers builds them.

    Like diffusers, one table per batch from the first sample's ids: every sample of a batch has the same
    positions (same bucket, same reference shapes).
    """
    img = img_ids[0] if img_ids.ndim == 3 else img_ids
    txt = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
    img_cos, img_sin = transformer.pos_embed(img)
    txt_cos, txt_sin = transformer.pos_embed(txt)
    return torch.cat([txt_cos, img_cos], dim=0), torch.cat([txt_sin, img_sin], dim=0)


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

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
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

    def __call__(self, attn, hidden_states: Tensor, attention_mask: Tensor | None = None,
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


# -------------------------------------------------------------------------------------- the forward


def _run_block(block: torch.nn.Module, *args: Any, use_checkpoint: bool) -> Any:
    if use_checkpoint:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def block_forward(transformer: torch.nn.Module, *, hidden_states: Tensor, encoder_hidden_states: Tensor,
                  timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | None = None,
                  checkpoint_every: int | None = None, routing: tread.Routing | None = None) -> Tensor:
    """Flux2Transformer2DModel.forward's output (B, N, out_channels), computed block by block.

    checkpoint_every: None, or N >= 1 to recompute in backward every block whose index (double blocks
    first, then single blocks) is a multiple of N (1: every block). Only while gradients are enabled.
    routing: TREAD routes with each sample's kept image tokens (tread.draw_routing), or None.
    """
    t = transformer
    num_text = encoder_hidden_states.shape[1]
    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    temb = t.time_guidance_embed(timestep, guidance)
    mod_img = t.double_stream_modulation_img(temb)
    mod_txt = t.double_stream_modulation_txt(temb)
    mod_single = t.single_stream_modulation(temb)
    img = t.x_embedder(hidden_states)
    txt = t.context_embedder(encoder_hidden_states)
    full_rotary = rotary_table(t, img_ids=img_ids, txt_ids=txt_ids)

    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    num_double = len(t.transformer_blocks)
    checkpointing = checkpoint_every is not None and torch.is_grad_enabled()
    rotary = full_rotary
    joint = None  # the single-stream sequence [text, image] once past the double blocks
    before_route = index = None
    for i, block in enumerate(blocks):
        if i == num_double:
            joint = torch.cat([txt, img], dim=1)
        starting = routing.route_starting_at(i) if routing is not None else None
        if starting is not None:
            # Routed-around tokens keep these activations; the kept ones go through with their own RoPE rows.
            index = routing.kept[starting].to(img.device)
            before_route = img if joint is None else joint[:, num_text:]
            kept = tread.gather_tokens(before_route, index)
            if joint is None:
                img = kept
            else:
                joint = torch.cat([joint[:, :num_text], kept], dim=1)
            rotary = tuple(tread.gather_rotary_rows(table, index, num_text=num_text) for table in full_rotary)
        use_checkpoint = checkpointing and i % checkpoint_every == 0
        if joint is None:
            txt, img = _run_block(block, img, txt, mod_img, mod_txt, rotary, None, use_checkpoint=use_checkpoint)
        else:
            joint = _run_block(block, joint, None, mod_single, rotary, None, use_checkpoint=use_checkpoint)
        if routing is not None and routing.route_ending_at(i) is not None:
            if joint is None:
                img = tread.scatter_tokens(before_route, img, index)
            else:
                joint = torch.cat([joint[:, :num_text], tread.scatter_tokens(before_route, joint[:, num_text:], index)], 1)
            rotary, before_route, index = full_rotary, None, None
    image = img if joint is None else joint[:, num_text:]
    return t.proj_out(t.norm_out(image, temb))


# ------------------------------------------------------------------------------- installing it


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockForwardSettings:
    checkpoint_every: int | None
    """Checkpoint every N-th block (1: all); None: no checkpointing."""
    routes: tuple[tread.Route, ...]
    """TREAD routes (empty: no TREAD)."""


class _BlockForward:
    """Placed before the transformer's class by apply_block_forward: its forward runs block_forward."""

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                timestep: Tensor | None = None, img_ids: Tensor | None = None, txt_ids: Tensor | None = None,
                guidance: Tensor | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
                return_dict: bool = True, kv_cache: Any = None, kv_cache_mode: str | None = None,
                num_ref_tokens: int = 0, ref_fixed_timestep: float = 0.0, *,
                tread_generators: list[torch.Generator] | None = None, num_target_tokens: int | None = None):
        """diffusers' signature (without KV caching), plus what a TREAD training step needs.

        tread_generators: one per sample (objective.sample_generators, after prepare_batch); required in
        training mode when routes are set. num_target_tokens: the image tokens that may be routed around
        (the rest are reference tokens); default all.
        """
        settings: BlockForwardSettings = self._block_forward_settings
        if kv_cache is not None or kv_cache_mode is not None or num_ref_tokens or ref_fixed_timestep:
            raise ValueError("the training forward has no KV-cache modes (kv_cache, kv_cache_mode, num_ref_tokens, "
                             "ref_fixed_timestep); use diffusers' Flux2Transformer2DModel.forward for those.")
        if joint_attention_kwargs:
            raise ValueError(f"the training forward takes no joint_attention_kwargs, got {sorted(joint_attention_kwargs)}; "
                             "LoRA scale and attention kwargs are diffusers' inference options.")
        routing = None
        if settings.routes and self.training:
            if tread_generators is None:
                raise ValueError("TREAD is on: a training forward needs tread_generators (one generator per "
                                 "sample, objective.sample_generators) to draw the routed tokens.")
            routing = tread.draw_routing(
                settings.routes, num_image_tokens=hidden_states.shape[1], generators=tread_generators,
                num_target_tokens=hidden_states.shape[1] if num_target_tokens is None else num_target_tokens,
            )
        output = block_forward(self, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                               checkpoint_every=settings.checkpoint_every, routing=routing)
        if not return_dict:
            return (output,)
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput

        return Flux2Transformer2DModelOutput(sample=output)


_CLASSES: dict[type, type] = {}


def apply_block_forward(transformer: torch.nn.Module, *, checkpoint_every: int | None = None,
                        routes: tuple[tread.Route, ...] = ()) -> torch.nn.Module:
    """Make transformer(...) run block_forward with these settings; returns the same module.

    Call after LoRA injection and before FSDP2/DDP and diffusers hooks (group offload): hooks added
    earlier would have captured diffusers' forward. Installs RoutedAttnProcessor /
    RoutedParallelSelfAttnProcessor on the blocks of the routes (they compute what diffusers' processors
    do, and accept per-sample rotary tables). Calling it again replaces the settings.
    """
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ValueError(f"gradient_checkpointing_interval must be >= 1 (1 checkpoints every block), "
                         f"got {checkpoint_every!r}.")
    if hasattr(transformer, "_diffusers_hook"):
        raise RuntimeError("apply_block_forward must run before diffusers hooks (group offload) are added to the "
                           "transformer: they wrap the forward that exists when they are added.")
    if any(p.numel() for p in transformer.parameters(recurse=False)):
        raise RuntimeError("block_forward expects a Flux2Transformer2DModel (no parameters of its own).")
    cls = type(transformer)
    if not issubclass(cls, _BlockForward):
        if cls not in _CLASSES:
            _CLASSES[cls] = type(f"BlockForward{cls.__name__}", (_BlockForward, cls), {})
        transformer.__class__ = _CLASSES[cls]
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    num_double = len(transformer.transformer_blocks)
    for route in routes:
        if not 0 <= route.start <= route.end < len(blocks):
            raise ValueError(f"TREAD route {route.start}..{route.end} is outside the model's {len(blocks)} blocks.")
        for i in range(route.start, route.end + 1):
            processor = RoutedAttnProcessor() if i < num_double else RoutedParallelSelfAttnProcessor()
            # Keep an attention backend chosen earlier (set_attention_backend stores it on the processor).
            processor._attention_backend = getattr(blocks[i].attn.processor, "_attention_backend", None)
            blocks[i].attn.set_processor(processor)
    transformer._block_forward_settings = BlockForwardSettings(checkpoint_every=checkpoint_every, routes=tuple(routes))
    return transformer
