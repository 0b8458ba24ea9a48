"""Our FLUX.2 transformer forward for training: diffusers' Flux2Transformer2DModel.forward, block by block.

`block_forward` computes what Flux2Transformer2DModel.forward computes without its KV-cache modes
(embeddings, modulation, rotary table from the ids, double blocks, concat, single blocks, norm_out,
proj_out), calling the model's own submodules: PEFT LoRA layers, FSDP2-sharded blocks and hooks on
them all apply. Owning the block loop is what lets it add:

- gradient checkpointing of every N-th block (torch.utils.checkpoint, non-reentrant), optionally keeping each
  checkpointed block's attention output (trainer/checkpointing.py);
- TREAD (trainer/tread.py): routed image tokens skip windows of blocks, each sample with its own RoPE rows;
- reference_timestep "zero": reference-image tokens (the image tokens after num_target_tokens) modulated as at
  timestep 0, SimpleTuner's FLUX.2 training (diffusers does it only in its KV-cache "extract" mode).

`apply_block_forward` makes a transformer's own forward run `block_forward` under a BlockForwardPlan and returns
that plan, which the caller keeps (loop.Model.block_forward). It sets an instance-level `forward`, which
nn.Module.__call__ finds before the class's: the module keeps diffusers' class, its state-dict keys and `inner`,
so FSDP2's fully_shard, DDP and hooks added later (group offload) wrap it as before. Apply it after LoRA and
before FSDP2/DDP and hooks.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import tread
from .checkpointing import save_attention_context

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


# -------------------------------------------------------------------------------------- the forward


def _run_block(block: Any, *args: Any, use_checkpoint: bool, save_attention: bool = False) -> Any:
    if use_checkpoint and save_attention:  # keep the attention output, recompute the rest (trainer/checkpointing.py)
        return checkpoint(block, *args, use_reentrant=False, context_fn=save_attention_context)
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



class _Modulated:
    """Runs a block with its stream's modulation: the shared (B, C) one, or one per token when the reference
    tokens are modulated as at timestep 0."""

    def __init__(self, *, shared: dict[str, Tensor], reference: dict[str, Tensor], num_refs: int,
                 save_attention: bool = False) -> None:
        self.shared, self.reference, self.num_refs = shared, reference, num_refs
        self.save_attention = save_attention
        self.per_token: dict[tuple[str, int], Tensor] = {}

    def run(self, block: torch.nn.Module, hidden: Tensor, encoder: Tensor | None, stream: str, *rest: Any,
            use_checkpoint: bool) -> Any:
        """block(hidden, encoder, modulation, *rest); stream: "img" (double blocks) or "single"."""
        shared = self.shared[stream]
        if not self.reference:
            return _run_block(block, hidden, encoder, shared, *rest, use_checkpoint=use_checkpoint,
                              save_attention=self.save_attention)
        if use_checkpoint:
            # Built inside the checkpoint: only the (B, C) modulations are kept for backward, and the
            # (B, S, C) tensor lives for one block (rebuilt in its recompute).
            call = functools.partial(_with_reference_modulation, block, num_refs=self.num_refs)
            return _run_block(call, hidden, encoder, shared, self.reference[stream], *rest, use_checkpoint=True,
                              save_attention=self.save_attention)
        # Blocks that keep their activations keep views of their modulation until backward: share one tensor
        # per stream length (full; kept inside a TREAD route, where references stay last).
        length = hidden.shape[1]
        if (stream, length) not in self.per_token:
            self.per_token[stream, length] = per_token_modulation(shared, self.reference[stream], length=length,
                                                                  num_refs=self.num_refs)
        return block(hidden, encoder, self.per_token[stream, length], *rest)


def _modulations(transformer: torch.nn.Module, *, timestep: Tensor, guidance: Tensor | None, dtype: torch.dtype,
                 zero_refs: int, save_attention: bool = False) -> tuple[Tensor, Tensor, _Modulated]:
    """(temb, the text stream's modulation, the image and single streams' as a _Modulated).

    zero_refs: the number of reference tokens modulated with temb(0, same guidance) (0: none). The text
    stream has no reference tokens.
    """
    t = transformer
    timestep = timestep.to(dtype) * 1000
    if guidance is not None:
        guidance = guidance.to(dtype) * 1000
    temb = t.time_guidance_embed(timestep, guidance)
    # diffusers' order (image, text, single): LoRA dropout on these layers draws from the global generator.
    mod_img = t.double_stream_modulation_img(temb)
    mod_txt = t.double_stream_modulation_txt(temb)
    shared = {"img": mod_img, "single": t.single_stream_modulation(temb)}
    reference: dict[str, Tensor] = {}
    if zero_refs:
        temb_ref = t.time_guidance_embed(torch.zeros_like(timestep), guidance)
        reference = {"img": t.double_stream_modulation_img(temb_ref), "single": t.single_stream_modulation(temb_ref)}
    return temb, mod_txt, _Modulated(shared=shared, reference=reference, num_refs=zero_refs,
                                     save_attention=save_attention)


def _image(img: Tensor, joint: Tensor | None, *, num_text: int) -> Tensor:
    """The image tokens of the stream: img in the double blocks, joint's tail once past them."""
    return img if joint is None else joint[:, num_text:]


def _put_image(image: Tensor, *, img: Tensor, joint: Tensor | None, num_text: int) -> tuple[Tensor, Tensor | None]:
    """(img, joint) with the image tokens replaced by image."""
    if joint is None:
        return image, None
    return img, torch.cat([joint[:, :num_text], image], dim=1)


def block_forward(transformer: torch.nn.Module, *, hidden_states: Tensor, encoder_hidden_states: Tensor,
                  timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | None = None,
                  checkpoint_every: int | None = None, routing: tread.Routing | None = None,
                  num_target_tokens: int | None = None, reference_timestep: ReferenceTimestep = "shared",
                  save_attention: bool = False) -> Tensor:
    """Flux2Transformer2DModel.forward's output (B, N, out_channels), computed block by block.

    checkpoint_every: None, or N >= 1 to recompute in backward every block whose index (double blocks
    first, then single blocks) is a multiple of N (1: every block). Only while gradients are enabled.
    routing: TREAD routes with each sample's kept image tokens (tread.draw_routing), or None.
    num_target_tokens: image tokens before the reference tokens (None: no references).
    reference_timestep: "shared" (diffusers' forward: every token gets the sample's timestep) or "zero": the
    reference tokens' image-stream modulation (double blocks) and single-stream modulation use the embedding
    of timestep 0 with the same guidance; text and target tokens keep timestep t. Their outputs, cut before
    the loss, still go through norm_out with t. save_attention: checkpointed blocks keep their attention output
    and recompute the rest (checkpointing.save_attention_context).
    """
    check_reference_timestep(reference_timestep)
    num_image = hidden_states.shape[1]
    if num_target_tokens is not None and not 1 <= num_target_tokens <= num_image:
        raise ValueError(f"num_target_tokens {num_target_tokens} must be in [1, {num_image}] (the image tokens).")
    num_refs = 0 if num_target_tokens is None else num_image - num_target_tokens
    t = transformer
    temb, mod_txt, modulated = _modulations(t, timestep=timestep, guidance=guidance, dtype=hidden_states.dtype,
                                            zero_refs=num_refs if reference_timestep == "zero" else 0,
                                            save_attention=save_attention)
    num_text = encoder_hidden_states.shape[1]
    img = t.x_embedder(hidden_states)
    txt = t.context_embedder(encoder_hidden_states)
    full_rotary = rotary_table(t, img_ids=img_ids, txt_ids=txt_ids)

    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    num_double = len(t.transformer_blocks)
    checkpointing = checkpoint_every is not None and torch.is_grad_enabled()
    rotary, joint, detour = full_rotary, None, None  # joint: the single-stream [text, image] past the double blocks
    for i, block in enumerate(blocks):
        if i == num_double:
            joint = torch.cat([txt, img], dim=1)
        starting = routing.route_starting_at(i) if routing is not None else None
        if starting is not None:
            # Routed-around tokens keep these activations; the kept ones go through with their own RoPE rows.
            kept, rotary, detour = tread.enter_route(_image(img, joint, num_text=num_text), kept=routing.kept[starting],
                                                     rotary=full_rotary, num_text=num_text)
            img, joint = _put_image(kept, img=img, joint=joint, num_text=num_text)
        use_checkpoint = checkpointing and i % checkpoint_every == 0
        if joint is None:
            txt, img = modulated.run(block, img, txt, "img", mod_txt, rotary, None, use_checkpoint=use_checkpoint)
        else:
            joint = modulated.run(block, joint, None, "single", rotary, None, use_checkpoint=use_checkpoint)
        if detour is not None and routing.route_ending_at(i) is not None:
            back = tread.leave_route(detour, _image(img, joint, num_text=num_text))
            img, joint = _put_image(back, img=img, joint=joint, num_text=num_text)
            rotary, detour = full_rotary, None
    return t.proj_out(t.norm_out(_image(img, joint, num_text=num_text), temb))


# ------------------------------------------------------------------------------- installing it


@dataclass(frozen=True, kw_only=True, slots=True)
class BlockForwardPlan:
    """What a transformer's forward does after apply_block_forward, which returns it for the caller to keep."""

    checkpoint_every: int | None
    """Checkpoint every N-th block (1: all); None: no checkpointing."""
    routes: tuple[tread.Route, ...]
    """TREAD routes (empty: no TREAD)."""
    save_attention: bool = False
    """Checkpointed blocks keep their attention output (trainer/checkpointing.py)."""

    @property
    def tread(self) -> bool:
        """Whether a training forward routes tokens, and so needs tread_generators."""
        return bool(self.routes)


class _TrainingForward:
    """transformer.forward after apply_block_forward: diffusers' signature, block_forward's computation under
    one BlockForwardPlan (held here, not on the module)."""

    __slots__ = ("transformer", "plan")

    def __init__(self, transformer: torch.nn.Module, *, plan: BlockForwardPlan) -> None:
        self.transformer, self.plan = transformer, plan

    def __call__(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 timestep: Tensor | None = None, img_ids: Tensor | None = None, txt_ids: Tensor | None = None,
                 guidance: Tensor | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
                 return_dict: bool = True, kv_cache: Any = None, kv_cache_mode: str | None = None,
                 num_ref_tokens: int = 0, ref_fixed_timestep: float = 0.0, *,
                 tread_generators: list[torch.Generator] | None = None, num_target_tokens: int | None = None,
                 reference_timestep: ReferenceTimestep = "shared") -> Any:
        """diffusers' signature (without KV caching), plus what a TREAD training step and references need.

        tread_generators: one per sample (objective.sample_generators, after prepare_batch); required in
        training mode when routes are set. num_target_tokens: the image tokens that may be routed around
        (the rest are reference tokens); default all. reference_timestep: "shared" or "zero" (block_forward).
        """
        if kv_cache is not None or kv_cache_mode is not None or num_ref_tokens or ref_fixed_timestep:
            raise ValueError("the training forward has no KV-cache modes (kv_cache, kv_cache_mode, num_ref_tokens, "
                             "ref_fixed_timestep); use diffusers' Flux2Transformer2DModel.forward for those.")
        if joint_attention_kwargs:
            raise ValueError(f"the training forward takes no joint_attention_kwargs, got {sorted(joint_attention_kwargs)}; "
                             "LoRA scale and attention kwargs are diffusers' inference options.")
        num_image = hidden_states.shape[1]
        routing = self._routing(num_image_tokens=num_image, generators=tread_generators,
                                num_target_tokens=num_image if num_target_tokens is None else num_target_tokens)
        output = block_forward(self.transformer, hidden_states=hidden_states,
                               encoder_hidden_states=encoder_hidden_states, timestep=timestep, img_ids=img_ids,
                               txt_ids=txt_ids, guidance=guidance, checkpoint_every=self.plan.checkpoint_every,
                               routing=routing, num_target_tokens=num_target_tokens,
                               reference_timestep=reference_timestep, save_attention=self.plan.save_attention)
        if not return_dict:
            return (output,)
        from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModelOutput

        return Flux2Transformer2DModelOutput(sample=output)

    def _routing(self, *, num_image_tokens: int, num_target_tokens: int,
                 generators: list[torch.Generator] | None) -> tread.Routing | None:
        """This forward's TREAD routing: only in training mode, drawn from the per-sample generators."""
        if not self.plan.routes or not self.transformer.training:
            return None
        if generators is None:
            raise ValueError("TREAD is on: a training forward needs tread_generators (one generator per "
                             "sample, objective.sample_generators) to draw the routed tokens.")
        return tread.draw_routing(self.plan.routes, num_image_tokens=num_image_tokens, generators=generators,
                                  num_target_tokens=num_target_tokens)


def supports_reference_timestep(module: torch.nn.Module) -> bool:
    """Whether module runs block_forward (and so takes reference_timestep): the transformer after
    apply_block_forward (also once FSDP2 has changed its class), or a wrapper holding it as .module (DDP) or
    .inner (the loop's validation wrapper)."""
    for candidate in (module, getattr(module, "module", None), getattr(module, "inner", None)):
        forward = getattr(candidate, "forward", None)
        # Hooks added later (diffusers' group offload) replace forward with a wrapper whose __wrapped__ is ours.
        if forward is not None and isinstance(inspect.unwrap(forward), _TrainingForward):
            return True
    return False


def _check_installable(transformer: torch.nn.Module, *, checkpoint_every: int | None) -> None:
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ValueError(f"gradient_checkpointing_interval must be >= 1 (1 checkpoints every block), "
                         f"got {checkpoint_every!r}.")
    # A hook (diffusers', accelerate's) sets an instance forward of its own; diffusers' registry, also one with no
    # hook yet, lives in _diffusers_hook (HookRegistry.check_if_exists_or_initialize reads that attribute too).
    wrapped = "forward" in vars(transformer) and not isinstance(vars(transformer)["forward"], _TrainingForward)
    if wrapped or hasattr(transformer, "_diffusers_hook"):
        raise RuntimeError("apply_block_forward must run before diffusers hooks (group offload) are added to the "
                           "transformer: they wrap the forward that exists when they are added.")
    if any(p.numel() for p in transformer.parameters(recurse=False)):
        raise RuntimeError("block_forward expects a Flux2Transformer2DModel (no parameters of its own).")


def apply_block_forward(transformer: torch.nn.Module, *, checkpoint_every: int | None = None,
                        routes: tuple[tread.Route, ...] = (), save_attention: bool = False) -> BlockForwardPlan:
    """Make transformer(...) run block_forward with these settings; returns the plan it runs under.

    Call after LoRA injection and before FSDP2/DDP and diffusers hooks (group offload): hooks added
    earlier would have captured diffusers' forward. Installs tread's routed attention processors on the
    blocks of the routes. Calling it again replaces the plan.
    """
    _check_installable(transformer, checkpoint_every=checkpoint_every)
    plan = BlockForwardPlan(checkpoint_every=checkpoint_every, routes=tuple(routes), save_attention=save_attention)
    tread.apply_routed_processors(transformer, routes=plan.routes)
    # An instance attribute rather than a new class: nn.Module.__call__ reads self.forward, which finds it
    # before the class's, so the module stays a Flux2Transformer2DModel with its own state-dict keys.
    transformer.forward = _TrainingForward(transformer, plan=plan)
    return plan
