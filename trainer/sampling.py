"""Euler sampling for FLUX.2, step for step what Flux2Pipeline does (tests compare the two), and for FLUX.2 [klein]
what Flux2KleinPipeline does: no guidance embedding, classifier-free guidance against a negative prompt instead.

The Euler state is kept in float32 whatever the transformer's dtype; diffusers rounds it back to the model dtype
after every step, so in bf16 the two differ by that rounding only (in fp32 they are identical).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import flux2
from .blocks import (
    ReferenceTimestep,
    check_reference_timestep,
    supports_reference_timestep,
)


def check_size(*, width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value < flux2.PIXELS_PER_TOKEN or value % flux2.PIXELS_PER_TOKEN:
            raise ValueError(
                f"{name} {value} must be a multiple of {flux2.PIXELS_PER_TOKEN} and >= {flux2.PIXELS_PER_TOKEN} "
                f"(one FLUX.2 token covers {flux2.PIXELS_PER_TOKEN} px); for example "
                f"{max(flux2.PIXELS_PER_TOKEN, round(value / flux2.PIXELS_PER_TOKEN) * flux2.PIXELS_PER_TOKEN)}."
            )


def check_steps(num_steps: int, *, name: str = "num_steps") -> None:
    """name: what the caller calls the setting (the Sample node's input is "steps")."""
    if num_steps < 1:
        raise ValueError(f"{name} {num_steps} must be >= 1; FLUX.2-dev usually samples with 28-50 steps.")


def initial_noise(
    *,
    batch_size: int,
    height_px: int,
    width_px: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Starting noise (B, 128, H/16, W/16), independent of the device.

    One torch.randn call of that shape in float32 from torch.Generator("cpu").manual_seed(seed), then moved and
    cast: the same numbers as diffusers' randn_tensor (and Flux2Pipeline.prepare_latents) with a CPU generator
    and dtype float32.
    """
    check_size(width=width_px, height=height_px)
    per_token = flux2.PIXELS_PER_TOKEN
    shape = (batch_size, flux2.PATCHIFIED_CHANNELS, height_px // per_token, width_px // per_token)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _model_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def has_guidance_embedding(transformer) -> bool:
    """Whether the transformer (or the one a DDP / validation wrapper holds) has a guidance embedding: FLUX.2-dev
    does, FLUX.2 [klein] does not (its config's guidance_embeds)."""
    for candidate in (transformer, getattr(transformer, "inner", None), getattr(transformer, "module", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "guidance_embeds"):
            return bool(config.guidance_embeds)
    return True


@torch.no_grad()
def denoise(
    transformer,
    *,
    prompt_embeds: Tensor,
    latents: Tensor,
    num_steps: int,
    guidance: float,
    reference_latents: list[Tensor] | None = None,
    reference_timestep: ReferenceTimestep = "shared",
    callback: Callable[[int, int], None] | None = None,
    negative_prompt_embeds: Tensor | None = None,
) -> Tensor:
    """Euler-integrate from noise latents (B, 128, h, w) to clean latents (B, 128, h, w), float32.

    Runs on prompt_embeds' device. The model gets timestep = sigma (it scales by 1000 inside) and, when it has a
    guidance embedding (dev), the guidance value per sample. Without one (klein) guidance is the classifier-free
    scale: with negative_prompt_embeds (klein base: the encoding of "") and guidance > 1 each step runs the
    negative too and takes neg + guidance * (pos - neg), as Flux2KleinPipeline; otherwise (a distilled klein: no
    negative) guidance is unused. Reference latents, each (B or 1, 128, h_k, w_k) and normalised like encode_images
    returns them, are appended after the target tokens with reference_position_ids and their outputs dropped.
    reference_timestep: "shared" (Flux2Pipeline and ComfyUI: references get sigma too) or "zero" (references
    modulated as at timestep 0, as a LoRA trained with reference_timestep "zero" saw them; needs the
    trainer's forward, blocks.apply_block_forward).
    callback(step_index, num_steps) runs after each step (0-based); raising in it stops sampling.
    """
    check_steps(num_steps)
    check_reference_timestep(reference_timestep)
    batch, channels, height, width = latents.shape
    if channels != flux2.PATCHIFIED_CHANNELS:
        raise ValueError(f"latents must be (B, {flux2.PATCHIFIED_CHANNELS}, h, w), got {tuple(latents.shape)}.")
    if prompt_embeds.shape[0] != batch:
        raise ValueError(f"prompt_embeds has batch {prompt_embeds.shape[0]} but latents has {batch}; pass one each.")
    device = prompt_embeds.device
    model_dtype = _model_dtype(transformer)
    num_target = height * width

    x = flux2.pack_latents(latents.to(device=device, dtype=torch.float32))
    img_ids = flux2.image_position_ids(batch, height, width)
    ref_tokens = None
    if reference_latents:
        for k, ref in enumerate(reference_latents):
            if ref.ndim != 4 or ref.shape[1] != flux2.PATCHIFIED_CHANNELS or ref.shape[0] not in (1, batch):
                raise ValueError(
                    f"reference_latents[{k}] must be (1 or {batch}, 128, h, w), got {tuple(ref.shape)}; "
                    "encode reference images with flux2.encode_images."
                )
        ref_tokens = torch.cat(
            [flux2.pack_latents(ref.to(device)).expand(batch, -1, -1) for ref in reference_latents], dim=1
        ).to(model_dtype)
        shapes = [(int(ref.shape[-2]), int(ref.shape[-1])) for ref in reference_latents]
        img_ids = torch.cat([img_ids, flux2.reference_position_ids(shapes, batch)], dim=1)
    img_ids = img_ids.to(device)
    txt_ids = flux2.text_position_ids(batch, prompt_embeds.shape[1]).to(device)
    encoder_hidden_states = prompt_embeds.to(model_dtype)
    guidance_vec, negative = None, None
    if has_guidance_embedding(transformer):
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds: this transformer has a guidance embedding (FLUX.2-dev), which "
                             "takes the guidance value instead of classifier-free guidance; pass no negative prompt.")
        guidance_vec = torch.full((batch,), float(guidance), device=device, dtype=torch.float32)
    elif negative_prompt_embeds is not None and guidance > 1:
        if tuple(negative_prompt_embeds.shape) not in ((1, *prompt_embeds.shape[1:]), tuple(prompt_embeds.shape)):
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must be (1 or {batch}, "
                             f"{prompt_embeds.shape[1]}, {prompt_embeds.shape[2]}) like prompt_embeds.")
        negative = negative_prompt_embeds.to(device=device, dtype=model_dtype).expand_as(encoder_hidden_states)

    extra = {}
    if reference_timestep != "shared" and ref_tokens is not None:
        if not supports_reference_timestep(transformer):
            raise ValueError(f"reference_timestep {reference_timestep!r} needs the trainer's forward "
                             "(blocks.apply_block_forward); diffusers' Flux2Transformer2DModel.forward gives reference "
                             "tokens the shared timestep. Use reference_timestep 'shared' with this transformer.")
        extra = {"reference_timestep": reference_timestep, "num_target_tokens": num_target}

    sigmas = flux2.sampling_sigmas(num_steps, image_seq_len=num_target).to(device)
    for i in range(num_steps):
        hidden = x.to(model_dtype)
        if ref_tokens is not None:
            hidden = torch.cat([hidden, ref_tokens], dim=1)
        def predict(text: Tensor) -> Tensor:
            out = transformer(hidden_states=hidden, encoder_hidden_states=text,
                              timestep=sigmas[i].expand(batch).to(model_dtype), img_ids=img_ids, txt_ids=txt_ids,
                              guidance=guidance_vec, return_dict=False, **extra)[0]
            return out[:, :num_target]

        pred = predict(encoder_hidden_states)
        if negative is not None:  # in the model's dtype, as the pipeline combines them
            uncond = predict(negative)
            pred = uncond + guidance * (pred - uncond)
        pred = pred.float()
        x = x + (sigmas[i + 1] - sigmas[i]) * pred
        if callback is not None:
            callback(i, num_steps)
    return flux2.unpack_latents(x, height=height, width=width)


@torch.no_grad()
def generate_images(
    transformer,
    vae,
    *,
    prompt_embeds: Tensor,
    width: int,
    height: int,
    num_steps: int,
    guidance: float,
    seed: int,
    reference_latents: list[Tensor] | None = None,
    reference_timestep: ReferenceTimestep = "shared",
    callback: Callable[[int, int], None] | None = None,
    negative_prompt_embeds: Tensor | None = None,
) -> Tensor:
    """Images (B, height, width, 3) float32 on the CPU in [0, 1] (ComfyUI's IMAGE layout), one per prompt.

    Noise from initial_noise(seed) for the whole batch, denoise on prompt_embeds' device, decode with the VAE.
    reference_latents, reference_timestep, guidance and negative_prompt_embeds: as denoise takes them.
    """
    check_size(width=width, height=height)
    check_steps(num_steps)
    noise = initial_noise(
        batch_size=prompt_embeds.shape[0], height_px=height, width_px=width, seed=seed, device=prompt_embeds.device
    )
    latents = denoise(
        transformer,
        prompt_embeds=prompt_embeds,
        latents=noise,
        num_steps=num_steps,
        guidance=guidance,
        reference_latents=reference_latents,
        reference_timestep=reference_timestep,
        callback=callback,
        negative_prompt_embeds=negative_prompt_embeds,
    )
    images = flux2.decode_latents(vae, latents)
    return (images.float() * 0.5 + 0.5).clamp(0.0, 1.0).permute(0, 2, 3, 1).cpu()
