"""The FLUX.2 training objective for one batch: flow matching with guidance and caption dropout.

x_t = (1 - s) x0 + s e, target e - x0, MSE over the target image tokens. s ~ sigmoid(N(0, 1)) with a
shift. The model gets timestep s (it scales by 1000 inside) and the guidance value through its
guidance embedding: constant, or uniform in [min, max] per sample. Reference-image tokens (edit LoRAs)
follow the target tokens and get timestep s too ("shared") or are modulated as at timestep 0 ("zero",
blocks.block_forward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import flux2
from .config import GuidanceConfig, ObjectiveConfig, ReferenceTimestep

log = logging.getLogger(__name__)


def sample_guidance(guidance: GuidanceConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """One guidance value per sample (each sample has its own generator): constant, or uniform in [min, max]."""
    if guidance.mode == "constant":
        return torch.full((len(generators),), float(guidance.value))
    u = torch.cat([torch.rand(1, generator=g) for g in generators])
    return guidance.minimum + (guidance.maximum - guidance.minimum) * u


def warn_unused_reference_timestep(spec: ObjectiveConfig, *, has_references: bool) -> None:
    """Warn (STYLE §4: harmless but probably not meant) when reference_timestep is set for a dataset without
    references; only the manifest knows, so the loop calls this at run start."""
    if spec.reference_timestep != "shared" and not has_references:
        log.warning("config: reference_timestep=%r has no effect because the dataset has no reference images.",
                    spec.reference_timestep)


def sample_generators(*, seed: int, step: int, first_index: int, count: int) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, step, the sample's index in the global batch).

    Noise, timestep, guidance and caption dropout of a sample then depend neither on the number of
    processes nor on whether the run was resumed: 1 x batch 2 equals 2 x batch 1, and resume is exact.
    """
    return [
        torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + (first_index + i) * 131) % (2**63 - 1))
        for i in range(count)
    ]


@dataclass(frozen=True, kw_only=True, slots=True)
class PreparedBatch:
    hidden_states: torch.Tensor
    """Packed noisy target tokens, then reference tokens (B, N_img + N_ref, 128)."""
    encoder_hidden_states: torch.Tensor
    timestep: torch.Tensor
    guidance: torch.Tensor | None
    """Per-sample guidance for the guidance embedding; None for a transformer without one (FLUX.2 [klein])."""
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    target: torch.Tensor
    """Packed flow target of the target image tokens only (B, N_img, 128)."""
    num_target_tokens: int
    sigmas: torch.Tensor
    reference_timestep: ReferenceTimestep = "shared"
    """How the model modulates the reference tokens (ObjectiveConfig.reference_timestep)."""
    loss_weight: torch.Tensor | None = None
    """ReflexFlow (trainer/rollout.py): per-element weights of the squared error (B, N_img, 128); None: all 1."""
    drift_weight: torch.Tensor | None = None
    """ReflexFlow: per-sample weight of the anti-drift term (B,), 0 for samples not rolled out; None: no term."""
    drift_direction: torch.Tensor | None = None
    """ReflexFlow: per-sample unit vector (B, N_img * 128) the prediction is pulled towards."""


def prepare_batch(
    *,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    empty_embeds: torch.Tensor | None,
    spec: ObjectiveConfig,
    generators: list[torch.Generator],
    reference_latents: list[torch.Tensor] | None = None,
    guidance_embeds: bool = True,
) -> PreparedBatch:
    """Noise, timesteps, guidance, dropout and ids for one batch of cached latents (B, 128, h, w).

    guidance_embeds: whether the transformer has a guidance embedding (its config's guidance_embeds; false on
    klein). Without one no guidance is drawn or passed (drawn last, so the other draws do not change).
    """
    batch, _, h, w = latents.shape
    if len(generators) != batch:
        raise ValueError(f"prepare_batch needs one generator per sample: {len(generators)} for a batch of {batch}")
    x0 = latents.float()
    noise = spec.noise_offset.apply(torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]),
                                    generators)
    shift = flux2.resolution_shift(h * w) if spec.auto_shift else spec.shift
    sigmas = torch.cat([flux2.sample_training_sigmas(1, shift=shift, generator=g) for g in generators])
    x_t = flux2.noisy_latents(x0, noise, sigmas)
    target = flux2.pack_latents(flux2.flow_target(x0, noise))

    embeds = prompt_embeds
    if spec.caption_dropout_probability > 0:
        if empty_embeds is None:
            raise ValueError("caption_dropout_probability > 0 needs the empty-prompt encoding in the dataset cache.")
        drop = torch.cat([torch.rand(1, generator=g) for g in generators]) < spec.caption_dropout_probability
        if drop.any():
            embeds = torch.where(drop.view(-1, 1, 1), empty_embeds.to(embeds.dtype).expand_as(embeds), embeds)

    tokens = flux2.pack_latents(x_t)
    img_ids = flux2.image_position_ids(batch, h, w)
    if reference_latents:
        ref_tokens = torch.cat([flux2.pack_latents(r.float()) for r in reference_latents], dim=1)
        tokens = torch.cat([tokens, ref_tokens], dim=1)
        ref_ids = flux2.reference_position_ids([tuple(r.shape[-2:]) for r in reference_latents], batch)
        img_ids = torch.cat([img_ids, ref_ids], dim=1)
    return PreparedBatch(
        hidden_states=tokens,
        encoder_hidden_states=embeds,
        timestep=sigmas,
        guidance=sample_guidance(spec.guidance, generators) if guidance_embeds else None,
        img_ids=img_ids,
        txt_ids=flux2.text_position_ids(batch, embeds.shape[1]),
        target=target,
        num_target_tokens=h * w,
        sigmas=sigmas,
        reference_timestep=spec.reference_timestep,
    )


def model_prediction(model: torch.nn.Module, prepared: PreparedBatch, *, device: torch.device, dtype: torch.dtype,
                     tread_generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """The model's prediction on the target tokens (B, N_img, 128), reference outputs cut.

    tread_generators: the batch's per-sample generators, for a model with TREAD routes (blocks.apply_block_forward);
    it draws the routed tokens from them. None for any other model, and for a forward in eval mode (the rollout).
    A batch with references and reference_timestep "zero" also needs the trainer's forward
    (blocks.apply_block_forward); with "shared" the model gets diffusers' arguments only.
    """
    extra: dict = {} if tread_generators is None else {
        "tread_generators": tread_generators, "num_target_tokens": prepared.num_target_tokens}
    if prepared.reference_timestep != "shared" and prepared.hidden_states.shape[1] > prepared.num_target_tokens:
        extra.update(reference_timestep=prepared.reference_timestep, num_target_tokens=prepared.num_target_tokens)
    pred = model(
        hidden_states=prepared.hidden_states.to(device=device, dtype=dtype),
        encoder_hidden_states=prepared.encoder_hidden_states.to(device=device, dtype=dtype),
        timestep=prepared.timestep.to(device=device, dtype=dtype),
        img_ids=prepared.img_ids.to(device),
        txt_ids=prepared.txt_ids.to(device),
        guidance=None if prepared.guidance is None else prepared.guidance.to(device=device, dtype=dtype),
        return_dict=False,
        **extra,
    )[0]
    return pred[:, : prepared.num_target_tokens]


def flow_matching_loss(model: torch.nn.Module, prepared: PreparedBatch, *, device: torch.device,
                       dtype: torch.dtype, tread_generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """MSE between the model's prediction on the target tokens and e - x0 (model_prediction's arguments).

    A batch the rollout changed (trainer/rollout.py) with ReflexFlow on carries per-element loss weights and an
    anti-drift direction: each sample's weighted mean squared error plus drift_weight * |unit(pred) - direction|^2,
    averaged over the batch. Any other batch: plain MSE.
    """
    pred = model_prediction(model, prepared, device=device, dtype=dtype, tread_generators=tread_generators).float()
    target = prepared.target.to(device=device, dtype=torch.float32)
    if prepared.loss_weight is None and prepared.drift_weight is None:
        return torch.nn.functional.mse_loss(pred, target)
    error = (pred - target).square()
    if prepared.loss_weight is not None:
        error = error * prepared.loss_weight.to(device)
    per_sample = error.flatten(1).mean(dim=1)
    if prepared.drift_weight is not None and prepared.drift_direction is not None:
        direction = torch.nn.functional.normalize(pred.flatten(1), dim=1, eps=1e-6)
        drift = (direction - prepared.drift_direction.to(device)).square().sum(dim=1)
        per_sample = per_sample + prepared.drift_weight.to(device) * drift
    return per_sample.mean()
