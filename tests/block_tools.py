"""Helpers for the block-forward and TREAD tests: the tiny FLUX.2 transformer built in-process, and inputs."""

from __future__ import annotations

import torch
from diffusers import Flux2Transformer2DModel

from flux2_lora_pack.trainer import blocks, flux2
from flux2_lora_pack.trainer.lora import apply_lora
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

NUM_BLOCKS = TRANSFORMER_CONFIG["num_layers"] + TRANSFORMER_CONFIG["num_single_layers"]


def tiny_transformer(*, seed: int = 0) -> Flux2Transformer2DModel:
    """The tiny FLUX.2 (2 double + 3 single blocks) with an all-layers LoRA whose B is random (so it acts)."""
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    apply_lora(model, preset="all", rank=4, alpha=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    return model


def tiny_inputs(*, batch: int = 2, h: int = 4, w: int = 4, text: int = 7, reference: bool = True, seed: int = 1):
    """Diffusers forward kwargs: target tokens, then (optionally) one 2x2-token reference image."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, h * w, 128, generator=g)
    img_ids = flux2.image_position_ids(batch, h, w)
    if reference:
        ref = flux2.pack_latents(torch.randn(batch, 128, 2, 2, generator=g))
        hidden = torch.cat([hidden, ref], dim=1)
        img_ids = torch.cat([img_ids, flux2.reference_position_ids([(2, 2)], batch)], dim=1)
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=torch.randn(batch, text, TRANSFORMER_CONFIG["joint_attention_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=flux2.text_position_ids(batch, text),
        guidance=torch.full((batch,), 3.5),
    )


def with_block_forward(model: torch.nn.Module, **settings) -> torch.nn.Module:
    """model after blocks.apply_block_forward(model, **settings), which returns the plan rather than the model."""
    blocks.apply_block_forward(model, **settings)
    return model


def diffusers_forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The stock forward, also on a model whose forward apply_block_forward replaced."""
    return Flux2Transformer2DModel.forward(model, **inputs, return_dict=False)[0]
