"""Text encoding with an on-disk cache, and image sampling with LoRAs, for one process.

Used by the ComfyUI nodes (Mistral Encode, FLUX.2 Sample) and by validation outside the trainer.
The text encoder and the transformer are never held at once: loading one releases the other.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import OffloadConfig, QuantizationConfig
from .model_files import ModelFolder, load_text_encoder, load_tokenizer, load_transformer, load_vae

if TYPE_CHECKING:
    import PIL.Image
    import torch

log = logging.getLogger(__name__)

CONVENTIONS_VERSION = "flux2-text-v1"
"""Bump when the text conventions change, so cached embeddings are recomputed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraRef:
    path: str
    """A LoRA .safetensors file (ComfyUI or diffusers layout)."""
    strength: float = 1.0
    """Multiplier on the LoRA delta; 0 disables it, negative inverts it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Flux2ModelSpec:
    """What FLUX2_MODEL carries through a graph: where the model is and how to load it, never weights."""

    folder: ModelFolder
    precision: str = "bf16"
    """Weights dtype for the transformer and text encoder: bf16, fp16 or fp32."""
    vae_precision: str = "fp32"
    loras: tuple[LoraRef, ...] = field(default_factory=tuple)
    quantization: QuantizationConfig | None = None
    """How the text encoder is quantized (text_encoder_1_precision, quantize_via), or None for not at all."""
    offload: OffloadConfig | None = None
    """How the text encoder is group-offloaded (group_offload_text_encoder), or None for not at all."""

    def with_lora(self, lora: LoraRef) -> "Flux2ModelSpec":
        return dataclasses.replace(self, loras=self.loras + (lora,))

    @property
    def text_precision_tag(self) -> str:
        """The text encoder's precision in cache keys (a quantized encoder gives other embeddings)."""
        return self.precision if self.quantization is None else self.quantization.text_cache_tag(self.precision)


# One loaded model set per process; guarded because ComfyUI may run nodes from another thread.
_lock = threading.RLock()
_loaded: dict[str, Any] = {}


def _release(*names: str) -> None:
    freed = False
    for name in names:
        if _loaded.pop(name, None) is not None:
            freed = True
    if freed:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def release_all() -> None:
    with _lock:
        _release("text", "image")


def _text_key(spec: Flux2ModelSpec) -> str:
    ident = {"te": spec.folder.text_encoder_config(), "w": spec.folder.identity()["text_encoder_weights"]}
    return hashlib.sha256(json.dumps([ident, spec.precision, str(spec.folder.root), repr(spec.quantization), repr(spec.offload)],
                                     default=str).encode()).hexdigest()


def _image_key(spec: Flux2ModelSpec, device: str) -> str:
    ident = [str(spec.folder.root), str(spec.folder.transformer_file), str(spec.folder.vae_file), spec.precision,
             spec.vae_precision, device]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def text_embedding_cache_key(spec: Flux2ModelSpec, prompt: str, *, max_length: int) -> str:
    """Content hash of (model text encoder, conventions, prompt, settings): equal keys give equal embeddings.

    dev and klein never share a key: their text encoder configs (Mistral3 vs Qwen3) differ, and so does every
    klein size's (tests/unit/test_klein.py)."""
    ident = spec.folder.identity()
    payload = json.dumps(
        {
            "text_encoder": ident["text_encoder"],
            "weights": ident["text_encoder_weights"],
            "tokenizer": sorted(p.name for p in spec.folder.tokenizer_dir.iterdir()),
            "precision": spec.text_precision_tag,
            "conventions": CONVENTIONS_VERSION,
            "max_length": max_length,
            "prompt": prompt,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_cached(path: Path):
    """A cached tensor, or None when missing or unreadable (a truncated file is deleted, not loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))["prompt_embeds"]
    except (SafetensorError, KeyError, OSError, RuntimeError) as exc:
        log.warning("text cache %s is unreadable (%s); recomputing it", path, exc)
        path.unlink(missing_ok=True)
        return None


def encode_prompts_cached(
    spec: Flux2ModelSpec,
    prompts: list[str],
    *,
    cache_dir: Path,
    device: str = "cpu",
    max_length: int | None = None,
) -> tuple[Any, list[bool]]:
    """Embeddings (B, 512, 3*hidden) for prompts, computing only those not cached on disk.

    Returns the stacked embeddings and, per prompt, whether it was truncated to max_length tokens
    (flux2.MAX_TEXT_TOKENS when None).
    """
    import torch

    from . import flux2

    max_length = flux2.MAX_TEXT_TOKENS if max_length is None else max_length
    keys = [text_embedding_cache_key(spec, p, max_length=max_length) for p in prompts]
    found: dict[str, Any] = {}
    truncated: dict[str, bool] = {}
    for key in set(keys):
        cached = _load_cached(cache_dir / f"{key}.safetensors")
        if cached is not None:
            found[key] = cached
            meta_path = cache_dir / f"{key}.json"
            truncated[key] = bool(json.loads(meta_path.read_text()).get("truncated")) if meta_path.is_file() else False
    missing = [(k, p) for k, p in dict(zip(keys, prompts)).items() if k not in found]
    if missing:
        with _lock:
            _release("image")  # never hold the transformer and the text encoder at once
            if _loaded.get("text_key") != _text_key(spec) or "text" not in _loaded:
                _release("text")
                if spec.quantization is None and spec.offload is None:
                    text_encoder = load_text_encoder(spec.folder, precision=spec.precision, device=device)
                else:  # quantized and/or group-offloaded as the run's config says
                    from . import offload

                    text_encoder = offload.load_text_encoder(spec.folder, precision=spec.precision, device=device,
                                                             quantization=spec.quantization, offload=spec.offload)
                _loaded["text"] = (text_encoder, load_tokenizer(spec.folder))
                _loaded["text_key"] = _text_key(spec)
            text_encoder, tokenizer = _loaded["text"]
            texts = [p for _, p in missing]
            flavour = spec.folder.flavour  # dev and klein encode text differently (trainer/flux2.py)
            _, _, was_truncated = flux2.tokenize_prompts(tokenizer, texts, max_length=max_length, flavour=flavour)
            with torch.no_grad():
                embeds = flux2.encode_prompts(text_encoder, tokenizer, texts, max_length=max_length, device=device,
                                              flavour=flavour)
            for (key, _), emb, cut in zip(missing, embeds.cpu(), was_truncated):
                found[key] = emb.contiguous()
                truncated[key] = cut
                _atomic_save({"prompt_embeds": found[key]}, cache_dir / f"{key}.safetensors", {"truncated": str(cut)})
                (cache_dir / f"{key}.json").write_text(json.dumps({"truncated": cut}))
            # Release right away: the next node most likely needs the transformer.
            _release("text")
    return torch.stack([found[k] for k in keys]), [truncated[k] for k in keys]


def _loaded_image_models(spec: Flux2ModelSpec, device: str):
    with _lock:
        key = _image_key(spec, device)
        if _loaded.get("image_key") != key or "image" not in _loaded:
            _release("text", "image")
            transformer = load_transformer(spec.folder, precision=spec.precision, device=device)
            vae = load_vae(spec.folder, precision=spec.vae_precision, device=device)
            _loaded["image"] = (transformer, vae)
            _loaded["image_key"] = key
        return _loaded["image"]


def check_text_features(folder: ModelFolder, embeds: Any, *, input_name: str) -> None:
    """Refuse embeddings another FLUX.2 encoded (dev 15360, klein-4b 7680, klein-9b 12288 features per token)
    before any weights load, naming both; the transformer would fail with a bare shape error."""
    expected = folder.transformer_config().get("joint_attention_dim")
    got = int(embeds.shape[-1])
    if expected is not None and got != int(expected):
        raise ValueError(
            f"{input_name} has {got} features per token, but this model ({folder.describe()}) takes {expected}: it "
            "was encoded by another FLUX.2's text encoder. Encode the prompt with the model you sample (base and "
            "distilled klein of one size share their text encoder)."
        )


def negative_for_sampling(spec: Flux2ModelSpec, *, guidance: float, negative_prompt_embeds: Any | None,
                          text_cache_dir: Path | None, device: str = "cpu", who: str = "FLUX.2 Sample") -> Any | None:
    """The negative embeddings sampling uses, or None for no classifier-free guidance, as Flux2KleinPipeline
    decides (flavours.uses_classifier_free_guidance):

    - FLUX.2-dev: guidance goes through the guidance embedding; a negative is refused (it could never act).
    - klein base, guidance > 1: CFG against the given negative, else against the encoding of "" (the pipeline's
      negative prompt), encoded with the on-disk text cache in text_cache_dir.
    - klein distilled, or guidance <= 1: no CFG; a given negative is ignored with a warning, as the pipeline
      warns about its guidance on a distilled model (so one graph can feed base and distilled previews alike).
    """
    from . import flux2
    from .flavours import uses_classifier_free_guidance

    folder = spec.folder
    if folder.spec.has_guidance_embedding:
        if negative_prompt_embeds is not None:
            raise ValueError(
                f"{who}: negative is connected, but {folder.spec.title} has no classifier-free guidance: its guidance "
                "value goes through the model's guidance embedding. Disconnect negative (it is for FLUX.2 [klein] base)."
            )
        return None
    if not uses_classifier_free_guidance(folder.spec, is_distilled=folder.is_distilled, guidance=guidance):
        why = ("the model is step-distilled (no CFG)" if folder.is_distilled
               else f"guidance {guidance:g} <= 1 turns classifier-free guidance off")
        if negative_prompt_embeds is not None:
            log.warning("%s: negative is ignored: %s.", who, why)
        if folder.is_distilled and guidance > 1:
            log.info("%s: guidance %g is ignored: %s.", who, guidance, why)
        return None
    if negative_prompt_embeds is not None:
        check_text_features(folder, negative_prompt_embeds, input_name="negative")
        return negative_prompt_embeds
    if text_cache_dir is None:
        raise ValueError(f"{who}: classifier-free guidance on {folder.describe()} needs a negative; connect one, or "
                         "pass text_cache_dir to encode the pipeline's empty negative prompt.")
    embeds, _ = encode_prompts_cached(spec, [flux2.KLEIN_NEGATIVE_PROMPT], cache_dir=text_cache_dir, device=device)
    return embeds


def sample_images(
    spec: Flux2ModelSpec,
    *,
    prompt_embeds,
    width: int,
    height: int,
    num_steps: int,
    guidance: float,
    seed: int,
    device: str = "cpu",
    reference_images: torch.Tensor | list[PIL.Image.Image] | None = None,
    callback: Callable[[int, int], None] | None = None,
    negative_prompt_embeds=None,
    text_cache_dir: Path | None = None,
):
    """Images (B, H, W, 3) in [0, 1] from prompt embeddings, with the spec's LoRAs active.

    reference_images: None, or FLUX.2 reference images (edit LoRAs, multi-reference editing) as
    flux2.prepare_reference_pixels takes them (a ComfyUI IMAGE batch, one reference per image, or a list of PIL
    images); each is prepared as Flux2Pipeline prepares `image=`, VAE-encoded and shared by every prompt.
    guidance, negative_prompt_embeds, text_cache_dir: as negative_for_sampling takes them (dev: the guidance
    embedding's value; klein base: the CFG scale; klein distilled: unused).
    """
    from . import flux2
    from .flavours import DISTILLED_STEPS
    from .lora_adapters import attached_loras
    from .sampling import check_size, check_steps, generate_images

    # Refuse a bad size, step count, prompt or reference image before gigabytes of weights load.
    check_size(width=width, height=height)
    check_steps(num_steps)
    check_text_features(spec.folder, prompt_embeds, input_name="positive")
    pixels = None if reference_images is None else flux2.prepare_reference_pixels(reference_images)
    if spec.folder.is_distilled and num_steps != DISTILLED_STEPS:
        log.info("FLUX.2 Sample: %s is made for %d steps; sampling with %d.", spec.folder.describe(), DISTILLED_STEPS,
                 num_steps)
    # Before the transformer loads: encoding the default negative needs the text encoder (never both at once).
    negative = negative_for_sampling(spec, guidance=guidance, negative_prompt_embeds=negative_prompt_embeds,
                                     text_cache_dir=text_cache_dir, device=device)
    transformer, vae = _loaded_image_models(spec, device)
    with _lock, attached_loras(transformer, loras=spec.loras):
        reference_latents = None
        if pixels is not None:
            import torch

            with torch.no_grad():
                reference_latents = [flux2.encode_images(vae, p) for p in pixels]
        return generate_images(
            transformer,
            vae,
            prompt_embeds=prompt_embeds.to(device=device, dtype=transformer.dtype),
            width=width,
            height=height,
            num_steps=num_steps,
            guidance=guidance,
            seed=seed,
            reference_latents=reference_latents,
            callback=callback,
            negative_prompt_embeds=None if negative is None else negative.to(device=device, dtype=transformer.dtype),
        )
