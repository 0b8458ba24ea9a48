"""Our FLUX.2 transformer forward for training: diffusers' Flux2Transformer2DModel.forward, block by block.

`block_forward` computes what Flux2Transformer2DModel.forward computes without its KV-cache modes
(embeddings, modulation, rotary table from the ids, double blocks, concat, single blocks, norm_out,
proj_out), calling the model's own submodules: PEFT LoRA layers, FSDP2-sharded blocks and hooks on
them all apply. Owning the block loop is what lets it add:

- gradient checkpointing of every N-th block (torch.utils.checkpoint, non-reentrant);
- TREAD (trainer/tread.py): routed image tokens skip windows of blocks, each sample with its own RoPE rows;
- reference_timestep "zero": reference-image tokens (the image tokens after num_target_tokens) modulated as at
  timestep 0, SimpleTuner's FLUX.2 training (diffusers does it only in its KV-cache "extract" mode).

`apply_block_forward` makes a transformer's own forward run `block_forward`, the way FSDP2's fully_shard
changes a module's class: the module stays the same object (same state-dict keys, same `inner`), so
FSDP2's root hooks, DDP and hooks added later (group offload) wrap it as before. Apply it after LoRA and
before FSDP2/DDP and hooks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

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


def _run_block(block: Any, *args: Any, use_checkpoint: bool) -> Any:
    if use_checkpoint:
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


ReferenceTimestep = Literal["shared", "zero"]
REFERENCE_TIMESTEPS: tuple[str, ...] = ("shared", "zero")


def check_reference_timestep(value: str) -> None:
    if value not in REFERENCE_TIMESTEPS:
        raise ValueError(f"reference_timestep {value!r} must be one of {list(REFERENCE_TIMESTEPS)}: 'shared' gives "
                         "reference tokens the sample's timestep, 'zero' modulates them as at timestep 0.")


def per_token_modulation(mod: Tensor, ref_mod: Tensor, *, length: int, num_refs: int) -> Tensor:
    """(B, C) modulations -> (B, length, C): `mod` for the first length - num_refs tokens, `ref_mod` for the rest.

    diffusers' blocks apply one (B, C) or (B, S, C) modulation to their whole stream, so a per-token split has
    to be materialised: block_forward builds it inside each checkpointed block, and once per stream length
    for the blocks that are not checkpointed.
    """
    batch = mod.shape[0]
    return torch.cat([mod.unsqueeze(1).expand(batch, length - num_refs, -1),
                      ref_mod.unsqueeze(1).expand(batch, num_refs, -1)], dim=1)


def _with_reference_modulation(block: torch.nn.Module, hidden: Tensor, encoder: Tensor | None, mod: Tensor,
                               ref_mod: Tensor, *rest: Any, num_refs: int) -> Any:
    """block(hidden, encoder, per-token modulation, *rest) with the per-token tensor built inside the call."""
    return block(hidden, encoder, per_token_modulation(mod, ref_mod, length=hidden.shape[1], num_refs=num_refs), *rest)


def block_forward(transformer: torch.nn.Module, *, hidden_states: Tensor, encoder_hidden_states: Tensor,
                  timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | None = None,
                  checkpoint_every: int | None = None, routing: tread.Routing | None = None,
                  num_target_tokens: int | None = None, reference_timestep: ReferenceTimestep = "shared") -> Tensor:
    """Flux2Transformer2DModel.forward's output (B, N, out_channels), computed block by block.

    checkpoint_every: None, or N >= 1 to recompute in backward every block whose index (double blocks
    first, then single blocks) is a multiple of N (1: every block). Only while gradients are enabled.
    routing: TREAD routes with each sample's kept image tokens (tread.draw_routing), or None.
    num_target_tokens: image tokens before the reference tokens (None: no references).
    reference_timestep: "shared" (diffusers' forward: every token gets the sample's timestep) or "zero": the
    reference tokens' image-stream modulation (double blocks) and single-stream modulation use the embedding
    of timestep 0 with the same guidance; text and target tokens keep timestep t. Their outputs, cut before
    the loss, still go through norm_out with t.
    """
    check_reference_timestep(reference_timestep)
    num_image = hidden_states.shape[1]
    if num_target_tokens is not None and not 1 <= num_target_tokens <= num_image:
        raise ValueError(f"num_target_tokens {num_target_tokens} must be in [1, {num_image}] (the image tokens).")
    num_refs = 0 if num_target_tokens is None else num_image - num_target_tokens
    t = transformer
    num_text = encoder_hidden_states.shape[1]
    timestep = timestep.to(hidden_states.dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(hidden_states.dtype) * 1000
    temb = t.time_guidance_embed(timestep, guidance)
    mod_img = t.double_stream_modulation_img(temb)
    mod_txt = t.double_stream_modulation_txt(temb)
    mod_single = t.single_stream_modulation(temb)
    # Reference tokens at timestep 0: the double blocks' image-stream and the single-stream modulation of
    # temb(0, same guidance). The text stream (mod_txt) has no reference tokens.
    ref_mods: dict[str, Tensor] = {}
    if reference_timestep == "zero" and num_refs:
        temb_ref = t.time_guidance_embed(torch.zeros_like(timestep), guidance)
        ref_mods = {"img": t.double_stream_modulation_img(temb_ref), "single": t.single_stream_modulation(temb_ref)}
    per_token: dict[tuple[str, int], Tensor] = {}

    def run(block: torch.nn.Module, hidden: Tensor, encoder: Tensor | None, stream: str, *rest: Any,
            use_checkpoint: bool) -> Any:
        """block(hidden, encoder, modulation, *rest), the modulation per token when references are at t = 0."""
        shared = mod_img if stream == "img" else mod_single
        if not ref_mods:
            return _run_block(block, hidden, encoder, shared, *rest, use_checkpoint=use_checkpoint)
        if use_checkpoint:
            # Built inside the checkpoint: only the (B, C) modulations are kept for backward, and the
            # (B, S, C) tensor lives for one block (rebuilt in its recompute).
            call = functools.partial(_with_reference_modulation, block, num_refs=num_refs)
            return _run_block(call, hidden, encoder, shared, ref_mods[stream], *rest, use_checkpoint=True)
        # Blocks that keep their activations keep views of their modulation until backward: share one tensor
        # per stream length (full; kept inside a TREAD route, where references stay last).
        length = hidden.shape[1]
        if (stream, length) not in per_token:
            per_token[stream, length] = per_token_modulation(shared, ref_mods[stream], length=length,
                                                             num_refs=num_refs)
        return block(hidden, encoder, per_token[stream, length], *rest)

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
            txt, img = run(block, img, txt, "img", mod_txt, rotary, None, use_checkpoint=use_checkpoint)
        else:
            joint = run(block, joint, None, "single", rotary, None, use_checkpoint=use_checkpoint)
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
                tread_generators: list[torch.Generator] | None = None, num_target_tokens: int | None = None,
                reference_timestep: ReferenceTimestep = "shared"):
        """diffusers' signature (without KV caching), plus what a TREAD training step and references need.

        tread_generators: one per sample (objective.sample_generators, after prepare_batch); required in
        training mode when routes are set. num_target_tokens: the image tokens that may be routed around
        (the rest are reference tokens); default all. reference_timestep: "shared" or "zero" (block_forward).
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
                               checkpoint_every=settings.checkpoint_every, routing=routing,
                               num_target_tokens=num_target_tokens, reference_timestep=reference_timestep)
        if not return_dict:
            return (output,)
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput

        return Flux2Transformer2DModelOutput(sample=output)


def supports_reference_timestep(module: torch.nn.Module) -> bool:
    """Whether module runs block_forward (and so takes reference_timestep): the transformer after
    apply_block_forward (FSDP2 keeps its class), or a wrapper holding it as .module (DDP) or .inner (the
    loop's validation wrapper)."""
    for candidate in (module, getattr(module, "module", None), getattr(module, "inner", None)):
        if isinstance(candidate, _BlockForward):
            return True
    return False


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
