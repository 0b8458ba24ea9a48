"""Validation images during training: prompts encoded once at run start, rendered with the current LoRA.

At start-up every rank calls validation_prompts before the transformer loads (rank 0 fills the text cache, the
others read it; the text encoder is released again), then prepare_validation after it: the validation VAE and
validation_reference_images' latents. ValidationRun.render runs the sampler on every rank (FSDP2 needs all of
them in the forward) and rank 0 writes the PNGs.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import parallelize

if TYPE_CHECKING:
    from .config import OffloadConfig, QuantizationConfig, TrainConfig, ValidationConfig
    from .model import Model
    from .model_files import ModelFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ValidationRun:
    """What each validation needs, prepared once: the prompts' embeddings, the VAE, reference latents."""

    settings: ValidationConfig
    prompts: list[tuple[str, str, torch.Tensor]]
    """(name, prompt, embeddings) of every validation prompt."""
    vae: Any
    offload: OffloadConfig
    reference_timestep: str
    references: list[torch.Tensor] | None
    negative: torch.Tensor | None = None
    """klein base: the encoding of its negative prompt "" for classifier-free guidance; None: no CFG."""

    def due(self, step: int, *, total: int) -> bool:
        """Whether step (1-based) renders: every validation_steps steps, and after the last step."""
        every = self.settings.every_steps
        return step == total or (every > 0 and step % every == 0)

    def render(self, model: Model, *, step: int, out_dir: Path, env: parallelize.DistEnv,
               variant: str | None = None) -> list[dict[str, Any]]:
        from .offload import onloaded

        with onloaded(self.vae, device=env.device, offload=self.offload):  # offload_during_startup
            return run_validation(model, self.vae, prompts=self.prompts, settings=self.settings, step=step,
                                  out_dir=out_dir, env=env, reference_timestep=self.reference_timestep,
                                  reference_latents=self.references, negative_prompt_embeds=self.negative,
                                  variant=variant)


def prepare_validation(config: TrainConfig, *, prompts: list[tuple[str, str, torch.Tensor]], folder: ModelFolder,
                       env: parallelize.DistEnv, dataset_has_references: bool,
                       negative: torch.Tensor | None = None) -> ValidationRun | None:
    """The run's validation over validation_prompts' result, or None when there is no validation prompt."""
    from .offload import load_validation_vae

    if not prompts:
        return None
    vae = load_validation_vae(folder, precision="fp32", device=str(env.device), offload=config.offload)
    references = validation_reference_latents(config.validation.reference_images, vae=vae, device=env.device,
                                              offload=config.offload)
    if env.is_main and references and not dataset_has_references:
        log.warning("config: validation_reference_images is set but the dataset has no reference images: "
                    "validation renders with references a LoRA never trained on.")
    return ValidationRun(settings=config.validation, prompts=prompts, vae=vae, offload=config.offload,
                         reference_timestep=config.objective.reference_timestep, references=references,
                         negative=negative)


def uses_classifier_free_guidance(settings: ValidationConfig, *, folder: ModelFolder) -> bool:
    """Whether validation renders with CFG, as Flux2KleinPipeline decides (flavours.uses_classifier_free_guidance
    with validation_guidance as the scale)."""
    from .flavours import uses_classifier_free_guidance as rule

    return rule(folder.spec, is_distilled=folder.is_distilled, guidance=settings.guidance)


def validation_prompts(settings: ValidationConfig, *, folder: ModelFolder, quantization: QuantizationConfig,
                       offload: OffloadConfig, env: parallelize.DistEnv,
                       cache_dir: Path) -> tuple[list[tuple[str, str, torch.Tensor]], torch.Tensor | None]:
    """(name, prompt, embeddings) of every validation prompt, and the negative prompt's embeddings (1, L, D) when
    validation uses CFG (klein base), else None; rank 0 encodes, then releases the encoder."""
    from . import flux2
    from .inference import Flux2ModelSpec, encode_prompts_cached, release_all

    prompts = settings.prompts() if settings.enabled else {}
    if not prompts:
        return [], None
    spec = Flux2ModelSpec(folder=folder, precision="fp32" if env.device.type == "cpu" else "bf16",
                          quantization=quantization, offload=offload)  # text_encoder_1_precision, group offload
    cfg = uses_classifier_free_guidance(settings, folder=folder)
    names, texts = list(prompts), list(prompts.values())
    encoded = texts + [flux2.KLEIN_NEGATIVE_PROMPT] if cfg else texts  # one text-encoder load for both
    if env.is_main:
        encode_prompts_cached(spec, encoded, cache_dir=cache_dir, device=str(env.device))
    parallelize.barrier(env)
    embeds, _ = encode_prompts_cached(spec, encoded, cache_dir=cache_dir, device=str(env.device))
    release_all()
    return [(n, t, e) for n, t, e in zip(names, texts, embeds)], (embeds[-1:] if cfg else None)


class _Unwrapped(torch.nn.Module):
    """Lets the sampler call a DDP-wrapped model by its diffusers signature and read its dtype."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.wrapped = model.module
        self.inner = model.inner

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def forward(self, **kwargs):
        return self.wrapped(**kwargs)


def validation_reference_latents(paths: tuple[Path, ...], *, vae, device: torch.device,
                                 offload: OffloadConfig | None = None) -> list[torch.Tensor] | None:
    """validation_reference_images encoded once by the validation VAE: (1, 128, h, w) each, or None for none.

    Prepared as Flux2Pipeline prepares `image=` (flux2.prepare_reference_pixels). Every rank encodes its own copy
    (posterior mode: no randomness), so no tensor crosses processes.
    """
    if not paths:
        return None
    from PIL import Image

    from . import flux2
    from .offload import onloaded

    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    pixels = flux2.prepare_reference_pixels(images, input_name="validation_reference_images")
    log.info("validation renders with %d reference image(s) of %s px (WxH, after FLUX.2's resize and crop)",
             len(pixels), ", ".join(f"{p.shape[-1]}x{p.shape[-2]}" for p in pixels))
    with torch.no_grad(), onloaded(vae, device=device, offload=offload):  # offload_during_startup
        return [flux2.encode_images(vae, p) for p in pixels]


def run_validation(model: Model, vae, *, prompts: list[tuple[str, str, torch.Tensor]], settings, step: int,
                   out_dir: Path, env: parallelize.DistEnv, reference_timestep: str = "shared",
                   reference_latents: list[torch.Tensor] | None = None,
                   negative_prompt_embeds: torch.Tensor | None = None, variant: str | None = None) -> list[dict[str, Any]]:
    """Render every validation prompt with the current LoRA; all ranks run the forward (FSDP2 needs it).

    reference_timestep: the training objective's, so images rendered with reference latents see them as training did.
    reference_latents: validation_reference_latents' result, given to every prompt; None renders without references.
    negative_prompt_embeds: validation_prompts' negative (klein base: CFG with scale validation_guidance) or None.
    variant: names the weights the model runs with ("ema"): the files end in _<variant>, the records say it.
    """
    from PIL import Image

    from .sampling import generate_images

    was_training = model.inner.training
    model.inner.eval()
    records = []
    try:
        with torch.no_grad():
            for (name, prompt, embeds), index in itertools.product(prompts, range(settings.num_images)):
                images = generate_images(
                    _Unwrapped(model), vae, prompt_embeds=embeds.unsqueeze(0).to(env.device, model.compute_dtype),
                    width=settings.width, height=settings.height, num_steps=settings.num_inference_steps,
                    guidance=settings.guidance, seed=settings.seed + index, reference_timestep=reference_timestep,
                    reference_latents=reference_latents, negative_prompt_embeds=None if negative_prompt_embeds is None
                    else negative_prompt_embeds.to(env.device, model.compute_dtype),
                )
                if env.is_main:
                    tail = f"_{variant}" if variant else ""  # which weights rendered it: "ema" for the EMA's
                    tail += f"_{index + 1}" if settings.num_images > 1 else ""  # num_validation_images
                    rel = Path("validation") / f"step{step:06d}_{_slug(name)}{tail}.png"
                    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    array = (images[0].numpy() * 255.0).round().clip(0, 255).astype("uint8")
                    Image.fromarray(array).save(out_dir / rel)
                    records.append({"name": name, "prompt": prompt, "path": rel.as_posix(), "seed": settings.seed + index}
                                   | ({"variant": variant} if variant else {}))
    finally:
        model.inner.train(was_training)
    return records


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40] or "prompt"
