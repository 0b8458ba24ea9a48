"""Load FLUX.2, Mistral Encode (FLUX.2) and FLUX.2 Sample: inference nodes over trainer.inference."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..trainer.config import CHOICES
from ..trainer.flavours import PIPELINE_GUIDANCE, PIPELINE_STEPS
from ..trainer.model_files import PRECISIONS, inspect_model_folder
from . import comfy_bridge

log = logging.getLogger("flux2_lora")

CATEGORY = "FLUX.2/training"
FROM_FOLDER = "(from model folder)"
NO_FOLDER_FOUND = "(no FLUX.2 folder in models/diffusers: set folder_path)"
MAX_RESOLUTION = 8192


def diffusers_model_choices() -> list[str]:
    """Folders under ComfyUI's models/diffusers that hold a model_index.json."""
    names: list[str] = []
    for root in comfy_bridge.model_folder_paths("diffusers"):
        if root.is_dir():
            # followlinks: users often symlink a model folder into models/diffusers.
            for folder, _, files in os.walk(root, followlinks=True):
                if "model_index.json" in files:
                    names.append(os.path.relpath(folder, root))
    return sorted(names) or [NO_FOLDER_FOUND]


def resolve_model_folder(model: str, folder_path: str) -> Path:
    if folder_path.strip():
        from .paths import MODEL_ROOTS_ENV, check_inside, model_roots

        return check_inside(folder_path.strip(), roots=model_roots(), input_name="folder_path", env_name=MODEL_ROOTS_ENV)
    if model == NO_FOLDER_FOUND:
        raise ValueError(
            "Load FLUX.2: no model chosen. Put the FLUX.2-dev diffusers folder in ComfyUI/models/diffusers "
            "or give its path in folder_path."
        )
    for root in comfy_bridge.model_folder_paths("diffusers"):
        candidate = (root / model).resolve()
        if candidate.is_relative_to(root.resolve()) and (candidate / "model_index.json").is_file():
            return candidate
    raise ValueError(f"Load FLUX.2: model {model!r} is not a folder under models/diffusers; refresh the node.")


class Flux2LoadModel:
    TITLE = "Load FLUX.2"
    DESCRIPTION = (
        "Points at a FLUX.2 model in the diffusers layout (models/diffusers) and checks it: FLUX.2-dev, or FLUX.2 "
        "[klein] 4B / 9B, base or distilled; which one it found is logged. Nothing is loaded here: the handle "
        "tells the encode, sample and train nodes where the weights are."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Handle to the FLUX.2 model (paths and precision; weights load lazily when used).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        transformer_files = [FROM_FOLDER] + comfy_bridge.list_model_files("diffusion_models")
        vae_files = [FROM_FOLDER] + comfy_bridge.list_model_files("vae")
        return {
            "required": {
                "model": (diffusers_model_choices(), {"tooltip": "FLUX.2 diffusers folder under models/diffusers (FLUX.2-dev, or FLUX.2-klein base/distilled 4B or 9B)."}),
                "precision": (list(PRECISIONS), {"default": "bf16", "tooltip": "Weights dtype of the transformer and text encoder. bf16 on GPUs; fp32 for CPU tests."}),
            },
            "optional": {
                "folder_path": ("STRING", {"default": "", "tooltip": "Any folder path instead of the list above (a diffusers FLUX.2 folder). Empty: use the list."}),
                "transformer_file": (transformer_files, {"default": FROM_FOLDER, "tooltip": "Optional single-file transformer from models/diffusion_models that replaces the folder's transformer."}),
                "vae_file": (vae_files, {"default": FROM_FOLDER, "tooltip": "Optional single-file VAE from models/vae that replaces the folder's VAE."}),
                "text_encoder_precision": (list(CHOICES["text_encoder_1_precision"]), {"default": "no_change", "tooltip": "Quantize the Mistral text encoder's weights (optimum-quanto) while Build Dataset, Mistral Encode and Train LoRA's validation prompts use it: int8-quanto halves its 48 GB (FLUX.2-dev), int4-quanto quarters it; layers are quantized one by one, so the full encoder never has to fit the GPU. Quantized embeddings differ slightly from no_change and are cached apart. Not with text_encoder_offload."}),
                "text_encoder_offload": (list(TEXT_ENCODER_OFFLOAD), {"default": "off", "tooltip": "Keep the Mistral text encoder in CPU memory and move its layers to the GPU group by group while encoding (diffusers group offload): block_level (groups of decoder layers, faster) or leaf_level (each layer, least GPU memory). Needs CPU RAM for the whole encoder. Same embeddings as off. Not with a quantized text_encoder_precision."}),
            },
        }

    def load(self, model: str, precision: str, folder_path: str = "", transformer_file: str = FROM_FOLDER,
             vae_file: str = FROM_FOLDER, text_encoder_precision: str = "no_change", text_encoder_offload: str = "off"):
        from ..trainer.inference import Flux2ModelSpec

        root = resolve_model_folder(model, folder_path)
        tfile = None if transformer_file == FROM_FOLDER else comfy_bridge.resolve_model_file("diffusion_models", transformer_file)
        vfile = None if vae_file == FROM_FOLDER else comfy_bridge.resolve_model_file("vae", vae_file)
        folder = inspect_model_folder(root, transformer_file=tfile, vae_file=vfile)
        log.info("Load FLUX.2: %s holds model_flavour %r: %s", root, folder.flavour, folder.describe())
        quantization, offload = text_encoder_settings(precision=text_encoder_precision, offload=text_encoder_offload)
        return (Flux2ModelSpec(folder=folder, precision=precision, quantization=quantization, offload=offload),)


TEXT_ENCODER_OFFLOAD = ("off", "block_level", "leaf_level")


def text_encoder_settings(*, precision: str, offload: str):
    """Load FLUX.2's text-encoder widgets as the trainer's configs (None, None when both are off, so the handle
    and its caches are what they were without them); a combination that cannot run is refused here."""
    from ..trainer.config import OffloadConfig, QuantizationConfig

    if offload not in TEXT_ENCODER_OFFLOAD:
        raise ValueError(f"Load FLUX.2: text_encoder_offload {offload!r} is not one of {list(TEXT_ENCODER_OFFLOAD)}.")
    quantization = QuantizationConfig(text_encoder_precision=precision) if precision != "no_change" else None
    settings = OffloadConfig(enabled=True, text_encoder=True, offload_type=offload) if offload != "off" else None
    if quantization is not None and settings is not None:
        quantization.check_text_encoder(offload=settings)  # quanto's weights cannot be moved by offload hooks
    return quantization, settings


class Flux2MistralEncode:
    TITLE = "Mistral Encode (FLUX.2)"
    DESCRIPTION = (
        "Encodes a prompt with FLUX.2's Mistral text encoder exactly as the official pipeline does (chat template, "
        "512 tokens, hidden layers 10/20/30); on a FLUX.2 [klein] model, with its Qwen3 text encoder as "
        "Flux2KleinPipeline does (layers 9/18/27). Results are cached on disk by content, so the text encoder runs "
        "once per distinct prompt and is unloaded before the transformer loads."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings [[tensor (1, 512, 3 x hidden), {}]]; FLUX.2 Sample and native samplers take it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model whose text encoder is used."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The prompt. Longer than 512 tokens is truncated (with a warning). Empty encodes the unconditional prompt."}),
            }
        }

    def encode(self, model, prompt: str):
        from ..trainer.inference import encode_prompts_cached

        if not isinstance(prompt, str):
            raise ValueError(f"Mistral Encode: prompt must be text, got {type(prompt).__name__}.")
        if not prompt.strip():
            log.warning("Mistral Encode: prompt is empty; encoding the empty (unconditional) prompt.")
        embeds, truncated = encode_prompts_cached(
            model,
            [prompt],
            cache_dir=text_cache_dir(),
            device=str(comfy_bridge.torch_device()),
        )
        if truncated[0]:
            log.warning("Mistral Encode: prompt is longer than 512 tokens and was truncated to 512.")
        return ([[embeds, {}]],)


def text_cache_dir() -> Path:
    """Where Mistral Encode and FLUX.2 Sample (klein's default negative "") cache prompt embeddings."""
    return comfy_bridge.output_directory() / "flux2_lora" / "cache" / "text"


def conditioning_tensor(conditioning, *, input_name: str):
    """The embeddings inside a CONDITIONING list, checked for FLUX.2's shape."""
    try:
        tensor = conditioning[0][0]
        shape = tuple(tensor.shape)
    except (TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"FLUX.2 Sample: {input_name} is not a CONDITIONING ([[tensor, {{}}]]).") from exc
    if len(shape) != 3:
        raise ValueError(f"FLUX.2 Sample: {input_name} has shape {shape}; expected (batch, tokens, features).")
    return tensor


class Flux2Sample:
    TITLE = "FLUX.2 Sample"
    DESCRIPTION = (
        "Renders images with FLUX.2 (Euler, the official pipeline's schedule and empirical time shift) from a "
        "FLUX2_MODEL and its LoRAs. FLUX.2-dev: guidance through its guidance embedding. FLUX.2 [klein] base: "
        "classifier-free guidance against `negative` (default: the empty prompt, as Flux2KleinPipeline). klein "
        "distilled: no guidance, made for 4 steps (a connected negative is ignored with a warning). Cancel stops "
        "between steps."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("Images (batch, height, width, 3), values 0..1.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "FLUX.2 model, with LoRAs from Apply LoRA if any."}),
                "positive": ("CONDITIONING", {"tooltip": "Prompt embeddings from Mistral Encode (FLUX.2)."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Image width in pixels (multiple of 16)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Image height in pixels (multiple of 16)."}),
                "steps": ("INT", {"default": PIPELINE_STEPS, "min": 1, "max": 200, "step": 1, "tooltip": "Denoising steps: 28-50 for FLUX.2-dev and FLUX.2 [klein] base, 4 for a step-distilled klein."}),
                "guidance": ("FLOAT", {"default": PIPELINE_GUIDANCE, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01, "tooltip": "FLUX.2-dev: the value fed to its guidance embedding (3-5 is typical). FLUX.2 [klein] base: the classifier-free guidance scale against negative (above 1 runs the model twice per step; 1 or less turns it off). Unused on a distilled klein."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1, "control_after_generate": True, "tooltip": "Noise seed; the same seed gives the same image on any device."}),
            },
            "optional": {
                "reference_images": ("IMAGE", {"tooltip": "Reference images for edit LoRAs and FLUX.2 multi-reference editing: each image of the batch becomes one reference, resized as FLUX.2's pipeline does (shrunk to about 1024x1024 pixels when larger, then centre-cropped to multiples of 16). Unconnected: plain text-to-image."}),
                "negative": ("CONDITIONING", {"tooltip": "FLUX.2 [klein] base only: the negative prompt's embeddings for classifier-free guidance (encode it with the same model). Unconnected: the empty prompt, as Flux2KleinPipeline. Ignored, with a warning, on a distilled klein; refused on FLUX.2-dev, which has no CFG."}),
            },
        }

    def sample(self, model, positive, width: int, height: int, steps: int, guidance: float, seed: int,
               reference_images=None, negative=None):
        from ..trainer.sampling import check_size, check_steps

        check_size(width=width, height=height)
        check_steps(steps, name="steps")
        embeds = conditioning_tensor(positive, input_name="positive")
        negative_embeds = None if negative is None else conditioning_tensor(negative, input_name="negative")
        progress = comfy_bridge.Progress(steps, label="FLUX.2 Sample")
        images = render_images(model, prompt_embeds=embeds, width=width, height=height, steps=steps, guidance=guidance,
                               seed=seed, reference_images=reference_images, negative_prompt_embeds=negative_embeds,
                               callback=lambda i, total: progress.update_absolute(i + 1))
        return (images,)


def render_images(model, *, prompt_embeds, width: int, height: int, steps: int, guidance: float, seed: int,
                  callback, reference_images=None, negative_prompt_embeds=None):
    """FLUX.2 Sample's rendering (also LoRA Grid's, cell by cell): the model's LoRAs attached, on ComfyUI's device,
    klein's default negative from the text cache; images (B, H, W, 3) float32 on the CPU. callback(step, total)."""
    from ..trainer.inference import sample_images

    images = sample_images(
        model,
        prompt_embeds=prompt_embeds,
        width=width,
        height=height,
        num_steps=steps,
        guidance=guidance,
        seed=seed,
        device=str(comfy_bridge.torch_device()),
        reference_images=reference_images,
        callback=callback,
        negative_prompt_embeds=negative_prompt_embeds,
        text_cache_dir=text_cache_dir(),
    )
    return images.float().cpu()


NODE_CLASS_MAPPINGS = {
    "Flux2LoraLoadModel": Flux2LoadModel,
    "Flux2LoraMistralEncode": Flux2MistralEncode,
    "Flux2LoraSample": Flux2Sample,
}
