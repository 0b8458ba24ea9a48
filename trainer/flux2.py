"""FLUX.2 conventions: text encoding, latents, position ids, timestep schedules.

Every function here reproduces what diffusers' Flux2Pipeline (0.42) and FlowMatchEulerDiscreteScheduler do
with FLUX.2-dev's configs; tests/unit/test_flux2_conventions.py compares each one with diffusers itself. The text
functions take a `flavour` (trainer/flavours.py): FLUX.2 [klein] encodes as diffusers' Flux2KleinPipeline does
(tests/unit/test_klein.py holds them against it).

Text: the Mistral3 chat template with the FLUX.2 system message, no generation prompt, padded to and
truncated at 512 tokens. Padding follows the tokenizer's padding_side (left on FLUX.2-dev's tokenizer, as in
diffusers); truncation cuts the end, so a truncated prompt loses its closing [/INST]. Hidden states 10, 20 and
30 (index 0 = embeddings) are stacked per token: (B, 512, 3 * H). Pad tokens stay in the sequence; the
transformer attends to them (it gets no text mask), exactly as in diffusers.

klein text: each prompt alone through the Qwen3 chat template (one user turn, no system message, generation
prompt added, enable_thinking=False, which closes an empty <think></think> block), then tokenized with padding to
and truncation at 512 tokens on the tokenizer's padding side; hidden states 9, 18 and 27 stacked per token:
(B, 512, 3 * H). "[IMG]" is not removed (there is no image token). Its negative prompt is always "".

Latents: VAE posterior mode -> 2x2 patchify (32 -> 128 channels) -> the VAE's frozen batch-norm statistics,
(x - mean) / sqrt(var + eps). One 128-channel token covers 16 x 16 pixels.

Position ids (t, h, w, l): text (0, 0, 0, i); target image (0, y, x, 0) row-major; reference image k
(10 + 10k, y, x, 0), appended after the target tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .flavours import KLEIN_FLAVOURS, SPECS
from .flavours import spec as flavour_spec

if TYPE_CHECKING:
    import PIL.Image

MAX_TEXT_TOKENS = 512
TEXT_HIDDEN_LAYERS = SPECS["dev"].text_hidden_layers  # (10, 20, 30)
KLEIN_TEXT_HIDDEN_LAYERS = SPECS["klein-4b"].text_hidden_layers  # (9, 18, 27), klein-9b's too
KLEIN_NEGATIVE_PROMPT = ""
"""What Flux2KleinPipeline encodes as the negative prompt of its classifier-free guidance (it takes no other)."""
REFERENCE_TIME_SCALE = 10
LATENT_CHANNELS = 32
PATCHIFIED_CHANNELS = 128
PIXELS_PER_TOKEN = 16

# The FLUX.2 system message (black-forest-labs/flux2 system_messages.py; diffusers keeps the same text, and a
# test checks they stay equal). Kept here so importing this module does not import diffusers' pipelines.
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


# ---------------------------------------------------------------------------------------------------- text


def format_messages(prompts: list[str], *, system_message: str = SYSTEM_MESSAGE) -> list[list[dict]]:
    """One chat per prompt: the system message, then the prompt as the user turn.

    "[IMG]" is removed from prompts as diffusers does: a literal image token in a caption would make a
    Pixtral processor expect an image.
    """
    return [
        [
            {"role": "system", "content": [{"type": "text", "text": system_message}]},
            {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]},
        ]
        for prompt in prompts
    ]


def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"prompts must be a list of strings, got {type(prompts).__name__}; wrap one prompt as [prompt]."
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass at least one prompt (use \"\" for the empty prompt).")


def text_hidden_layers(flavour: str = "dev") -> tuple[int, ...]:
    """The hidden states a flavour stacks into its text features: (10, 20, 30) for dev, (9, 18, 27) for klein."""
    return flavour_spec(flavour).text_hidden_layers


def format_klein_prompt(tokenizer, prompt: str) -> str:
    """The Qwen3 chat text of one klein prompt, as Flux2KleinPipeline makes it (a user turn, generation prompt,
    thinking disabled)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def _tokenize_klein(tokenizer, prompts: list[str], *, max_length: int) -> tuple[Tensor, Tensor, list[bool]]:
    # One prompt at a time, like the pipeline: each row is padded on its own to max_length.
    texts = [format_klein_prompt(tokenizer, p) for p in prompts]
    rows = [tokenizer(t, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
            for t in texts]
    truncated = [len(ids) > max_length for ids in tokenizer(texts, padding=False, truncation=False)["input_ids"]]
    return (torch.cat([r["input_ids"] for r in rows]), torch.cat([r["attention_mask"] for r in rows]), truncated)


def tokenize_prompts(
    tokenizer, prompts: list[str], *, max_length: int = MAX_TEXT_TOKENS, flavour: str = "dev"
) -> tuple[Tensor, Tensor, list[bool]]:
    """input_ids and attention_mask (B, max_length), and whether each prompt was cut at max_length.

    dev: a tokenizer or a processor that has the Mistral chat template (apply_chat_template). klein: the Qwen2
    tokenizer with the Qwen3 chat template.
    """
    _check_prompts(prompts)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}; FLUX.2 uses {MAX_TEXT_TOKENS}.")
    if flavour_spec(flavour).name in KLEIN_FLAVOURS:  # flavour_spec refuses an unknown flavour
        return _tokenize_klein(tokenizer, prompts, max_length=max_length)
    messages = format_messages(prompts)
    inputs = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=max_length,
    )
    # Tokenize again without truncation: the only reliable way to know whether anything was cut.
    full = tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=True, return_dict=True, padding=False, truncation=False
    )
    truncated = [len(ids) > max_length for ids in full["input_ids"]]
    return inputs["input_ids"], inputs["attention_mask"], truncated


def _num_text_layers(text_encoder) -> int:
    config = text_encoder.config
    text_config = getattr(config, "text_config", None) or config
    return int(text_config.num_hidden_layers)


def _check_hidden_layers(text_encoder, *, hidden_layers: Sequence[int]) -> None:
    num_layers = _num_text_layers(text_encoder)
    if not hidden_layers or min(hidden_layers) < 0 or max(hidden_layers) > num_layers:
        raise ValueError(
            f"hidden_layers {tuple(hidden_layers)} must index hidden states 0..{num_layers} (0 = embeddings) of a "
            f"text encoder with {num_layers} layers; FLUX.2 uses {TEXT_HIDDEN_LAYERS}, which needs >= 30 layers "
            f"(FLUX.2-dev's Mistral3 has 40); klein uses {KLEIN_TEXT_HIDDEN_LAYERS} (its Qwen3 has 36)."
        )


def encode_tokens(
    text_encoder,
    input_ids: Tensor,
    *,
    attention_mask: Tensor,
    hidden_layers: Sequence[int] = TEXT_HIDDEN_LAYERS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """(B, L, len(hidden_layers) * H): the chosen hidden states of the encoder, stacked per token."""
    _check_hidden_layers(text_encoder, hidden_layers=hidden_layers)
    dtype = text_encoder.dtype if dtype is None else dtype
    device = text_encoder.device if device is None else device
    # The text encoder is always frozen here: no graph, whatever the caller's grad mode.
    with torch.no_grad():
        output = text_encoder(
            input_ids=input_ids.to(text_encoder.device),
            attention_mask=attention_mask.to(text_encoder.device),
            output_hidden_states=True,
            use_cache=False,
        )
    stacked = torch.stack([output.hidden_states[k] for k in hidden_layers], dim=2)  # (B, L, K, H)
    return stacked.flatten(2).to(device=device, dtype=dtype)


def encode_prompts(
    text_encoder,
    tokenizer,
    prompts: list[str],
    *,
    hidden_layers: Sequence[int] | None = None,
    max_length: int = MAX_TEXT_TOKENS,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    flavour: str = "dev",
) -> Tensor:
    """Prompt embeddings (B, max_length, len(hidden_layers) * H) as Flux2Pipeline.encode_prompt (dev) or
    Flux2KleinPipeline.encode_prompt (klein) makes them.

    hidden_layers defaults to the flavour's; device and dtype to the text encoder's. Computed without gradients.
    """
    hidden_layers = text_hidden_layers(flavour) if hidden_layers is None else hidden_layers
    _check_hidden_layers(text_encoder, hidden_layers=hidden_layers)  # before tokenizing: fail fast
    input_ids, attention_mask, _ = tokenize_prompts(tokenizer, prompts, max_length=max_length, flavour=flavour)
    return encode_tokens(
        text_encoder, input_ids, attention_mask=attention_mask, hidden_layers=hidden_layers, device=device, dtype=dtype
    )


# ---------------------------------------------------------------------------------------------- positions


def text_position_ids(batch_size: int, seq_len: int) -> Tensor:
    """(B, L, 4) int64: (0, 0, 0, i) for text token i."""
    ids = torch.zeros(seq_len, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(seq_len)
    return ids.unsqueeze(0).expand(batch_size, -1, -1)


def _grid_ids(height: int, width: int, *, time_index: int) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ids = torch.zeros(height * width, 4, dtype=torch.int64)
    ids[:, 0] = time_index
    ids[:, 1] = ys.reshape(-1)
    ids[:, 2] = xs.reshape(-1)
    return ids


def image_position_ids(batch_size: int, height: int, width: int, *, time_index: int = 0) -> Tensor:
    """(B, height * width, 4) int64, row-major (t, y, x, 0); height and width in tokens."""
    return _grid_ids(height, width, time_index=time_index).unsqueeze(0).expand(batch_size, -1, -1)


def reference_position_ids(shapes: list[tuple[int, int]], batch_size: int) -> Tensor:
    """(B, sum h*w, 4) int64 for reference images of (h, w) tokens: image k gets t = 10 + 10k."""
    ids = [
        _grid_ids(h, w, time_index=REFERENCE_TIME_SCALE + REFERENCE_TIME_SCALE * k) for k, (h, w) in enumerate(shapes)
    ]
    if not ids:
        return torch.zeros(batch_size, 0, 4, dtype=torch.int64)
    return torch.cat(ids, dim=0).unsqueeze(0).expand(batch_size, -1, -1)


# ------------------------------------------------------------------------------------------------ latents


def patchify_latents(x: Tensor) -> Tensor:
    """(B, 32, 2h, 2w) -> (B, 128, h, w); channel c*4 + dy*2 + dx holds pixel (2y+dy, 2x+dx) of channel c."""
    b, c, hh, ww = x.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"latent height and width must be even to patchify, got {hh}x{ww}.")
    x = x.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, hh // 2, ww // 2)


def unpatchify_latents(x: Tensor) -> Tensor:
    """(B, 128, h, w) -> (B, 32, 2h, 2w); the inverse of patchify_latents."""
    b, c, h, w = x.shape
    if c % 4:
        raise ValueError(f"patchified latents need a multiple of 4 channels, got {c}.")
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C), tokens row-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(x: Tensor, *, height: int, width: int) -> Tensor:
    """(B, height*width, C) -> (B, C, height, width); height and width in tokens."""
    b, n, c = x.shape
    if n != height * width:
        raise ValueError(f"{n} tokens cannot be unpacked to {height}x{width}; pass the latent height and width.")
    return x.permute(0, 2, 1).reshape(b, c, height, width)


def latent_statistics(vae) -> tuple[Tensor, Tensor]:
    """The VAE's frozen batch-norm statistics over the 128 patchified channels: (mean, sqrt(var + eps))."""
    mean = vae.bn.running_mean.detach()
    std = torch.sqrt(vae.bn.running_var.detach() + vae.config.batch_norm_eps)
    return mean, std


def _stats_like(x: Tensor, *, vae) -> tuple[Tensor, Tensor]:
    mean, std = latent_statistics(vae)
    # Cast like diffusers: statistics in the latents' dtype and device.
    return mean.view(1, -1, 1, 1).to(x.device, x.dtype), std.view(1, -1, 1, 1).to(x.device, x.dtype)


def normalize_latents(x: Tensor, *, vae) -> Tensor:
    """Patchified VAE latents (B, 128, h, w) -> the transformer's latent space."""
    mean, std = _stats_like(x, vae=vae)
    return (x - mean) / std


def denormalize_latents(x: Tensor, *, vae) -> Tensor:
    """The inverse of normalize_latents."""
    mean, std = _stats_like(x, vae=vae)
    return x * std + mean


def _module_device(module) -> torch.device:
    return next(module.parameters()).device


def encode_images(vae, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 128, H/16, W/16) in the VAE's dtype.

    Posterior mode (no sampling noise), as Flux2Pipeline encodes reference images.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}.")
    height, width = images.shape[-2:]
    if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ValueError(
            f"image size {width}x{height} (WxH) must be a multiple of {PIXELS_PER_TOKEN} in both directions; "
            "crop or resize the image first."
        )
    images = images.to(device=_module_device(vae), dtype=vae.dtype)
    latents = vae.encode(images).latent_dist.mode()
    return normalize_latents(patchify_latents(latents), vae=vae)


REFERENCE_MAX_AREA = 1024 * 1024
"""Flux2Pipeline shrinks a reference image above this many pixels to about this area (Lanczos)."""


def check_reference_image(path: Path, *, input_name: str) -> None:
    """Refuse (ValueError naming input_name) an image file PIL cannot decode or prepare_reference_pixels refuses;
    decodes every pixel, so a truncated file fails when the setting is read, not at the first use."""
    import PIL.Image

    fix = "give a PNG, JPEG or WebP image"
    try:
        with PIL.Image.open(path) as image:
            image.load()
            prepare_reference_pixels([image], input_name=input_name)
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{input_name} is not an image file PIL can read; {fix}.") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{input_name} cannot be read as an image ({exc}); {fix}.") from None


def prepare_reference_pixels(
    images: Tensor | list[PIL.Image.Image], *, input_name: str = "reference_images"
) -> list[Tensor]:
    """Reference images -> one (1, 3, h, w) float32 tensor in [-1, 1] each, as Flux2Pipeline prepares `image=`.

    images: a ComfyUI IMAGE (B, H, W, 3) float in [0, 1], each of its B images one reference; or a list of PIL
    images. A tensor image is first made the uint8 PIL image diffusers' numpy_to_pil would make (x * 255,
    rounded), so a PNG loaded by ComfyUI (uint8 / 255) comes back exactly. Then, per image, as the pipeline does:
    above 1024 * 1024 pixels it is resized (PIL Lanczos) to about that area keeping its aspect ratio; both sides
    are floored to multiples of 16 (one token); the excess is cropped around the centre; RGB, / 255, * 2 - 1.
    Encode each result with encode_images; the k-th gets reference_position_ids' t = 10 + 10k.
    Unlike the pipeline (its check_image_input), sides under 64 px and aspect ratios above 8 are allowed;
    a side under 16 px after flooring is refused (ValueError naming input_name).
    """
    import numpy as np
    import PIL.Image

    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
            raise ValueError(
                f"{input_name} must be an IMAGE batch (B, H, W, 3) with values in [0, 1], got shape "
                f"{tuple(images.shape)}; convert it to RGB first."
            )
        arrays = (images.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
        pil_images = [PIL.Image.fromarray(a) for a in arrays]
    elif isinstance(images, (list, tuple)) and images and all(isinstance(im, PIL.Image.Image) for im in images):
        pil_images = list(images)
    else:
        raise ValueError(
            f"{input_name} must be an IMAGE tensor (B, H, W, 3) or a non-empty list of PIL images, got "
            f"{type(images).__name__}."
        )

    prepared = []
    for k, image in enumerate(pil_images):
        width, height = image.size
        if width * height > REFERENCE_MAX_AREA:
            # The pipeline's _resize_to_target_area: int() of each scaled side, so the area ends at or below 1024^2.
            scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
            image = image.resize((int(width * scale), int(height * scale)), PIL.Image.Resampling.LANCZOS)
        new_width = image.width // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        new_height = image.height // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
        if new_width < PIXELS_PER_TOKEN or new_height < PIXELS_PER_TOKEN:
            which = f" image {k}" if len(pil_images) > 1 else ""
            raise ValueError(
                f"{input_name}{which} is {width}x{height} (WxH), which leaves {new_width}x{new_height} after "
                f"flooring to multiples of {PIXELS_PER_TOKEN} px; give a reference at least {PIXELS_PER_TOKEN} px "
                "on each side (FLUX.2 works best with about 1024x1024)."
            )
        # Centre crop to the floored size, then RGB: the order of Flux2ImageProcessor.preprocess(resize_mode="crop").
        left = (image.width - new_width) // 2
        top = (image.height - new_height) // 2
        image = image.crop((left, top, left + new_width, top + new_height)).convert("RGB")
        # (1, H, W, 3) viewed as (1, 3, H, W): diffusers' memory layout (channels-last), which picks the same
        # convolution kernels in the VAE, so the latents match the pipeline's bit for bit.
        pixels = torch.from_numpy((np.array(image).astype(np.float32) / 255.0)[None].transpose(0, 3, 1, 2))
        prepared.append(2.0 * pixels - 1.0)
    return prepared


def decode_latents(vae, latents: Tensor) -> Tensor:
    """Normalised latents (B, 128, h, w) -> images (B, 3, 16h, 16w) clamped to [-1, 1], in the VAE's dtype.

    The clamp is what every consumer applies anyway ((x + 1) / 2 clamped to [0, 1] in diffusers' postprocess).
    """
    x = unpatchify_latents(denormalize_latents(latents, vae=vae))
    images = vae.decode(x.to(device=_module_device(vae), dtype=vae.dtype), return_dict=False)[0]
    return images.clamp(-1.0, 1.0)


# -------------------------------------------------------------------------------------- training timesteps


def shift_sigmas(sigmas: Tensor, *, shift: float) -> Tensor:
    """The static flow shift s' = shift * s / (1 + (shift - 1) * s); shift > 1 moves mass toward noise."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}; 1.0 means no shift, FLUX.2 training uses 3.0.")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_training_sigmas(
    batch_size: int,
    *,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B,) float32 sigmas: sigmoid(N(0, 1)) (logit-normal), then shift_sigmas.

    Drawn on the generator's device (CPU without one), then moved to device.
    """
    draw_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(batch_size, generator=generator, device=draw_device, dtype=torch.float32)
    sigmas = shift_sigmas(torch.sigmoid(u), shift=shift)
    return sigmas if device is None else sigmas.to(device)


def resolution_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent static shift exp(mu), mu linear in the token count (FLUX.1's calculate_shift).

    image_seq_len counts 128-channel (2x2-patchified) tokens: (H / 16) * (W / 16) for an H x W image, i.e. h * w
    of latents shaped (B, 128, h, w). So 256x256 px -> 256 tokens -> exp(0.5); 1024x1024 -> 4096 -> exp(1.15).
    Counting 32-channel VAE pixels instead would overstate the count 4x and the shift with it.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * slope + (base_shift - slope * base_seq_len)
    return math.exp(mu)


def noisy_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_t = (1 - s) x0 + s noise, with one sigma per sample broadcast over the other dims."""
    s = sigmas.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity the model predicts: noise - x0."""
    return noise - x0


# -------------------------------------------------------------------------------------- sampling timesteps


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The official FLUX.2 time-shift mu for a token count and a step count (flux2 sampling.py).

    Fitted at 10 and 200 steps and interpolated linearly in the step count; above 4300 tokens only the
    200-step fit is used.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    mu_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + (mu_200 - 200.0 * slope))


def sampling_sigmas(num_steps: int, *, image_seq_len: int) -> Tensor:
    """(num_steps + 1,) float32 sigmas from 1 down to 0 for Euler sampling, as Flux2Pipeline uses them.

    linspace(1, 1/N, N) (float64, then float32 as the scheduler casts), the exponential time shift
    exp(mu) / (exp(mu) + (1/s - 1)) with mu = empirical_mu, then a final 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    # numpy's linspace arithmetic (start + i * step, exact last value), so the float32 cast matches bit for bit.
    base = torch.ones(num_steps, dtype=torch.float64)
    if num_steps > 1:
        step = (1.0 / num_steps - 1.0) / (num_steps - 1)
        base = torch.arange(num_steps, dtype=torch.float64) * step + 1.0
        base[-1] = 1.0 / num_steps
    base = base.to(torch.float32)
    e = torch.tensor(math.exp(empirical_mu(image_seq_len, num_steps)), dtype=torch.float32)
    shifted = e / (e + (1 / base - 1))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float32)])
