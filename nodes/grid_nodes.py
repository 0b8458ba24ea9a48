"""LoRA Grid (FLUX.2): a run's checkpoints x LoRA strengths, rendered with FLUX.2 Sample's code path, one labelled
grid per prompt. Choosing the rows and columns and composing the grid live in trainer/grid.py."""

from __future__ import annotations

import logging

from ..trainer.flavours import PIPELINE_GUIDANCE, PIPELINE_STEPS
from . import comfy_bridge
from .model_nodes import CATEGORY, MAX_RESOLUTION, conditioning_tensor, render_images, text_cache_dir

log = logging.getLogger("flux2_lora")

DEFAULT_STRENGTHS = "0, 0.5, 1.0, 1.25"


class Flux2LoraGrid:
    TITLE = "LoRA Grid (FLUX.2)"
    DESCRIPTION = (
        "Compares a trained LoRA's checkpoints at several strengths: each cell is rendered as FLUX.2 Sample renders, "
        "with the same seed, so only the LoRA file (rows) and its strength (columns) change. One labelled grid per "
        "prompt, plus every cell as its own image. Every checkpoint of a run keeps its LoRA file for this. Cancel "
        "stops between cells (and between steps)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("grid", "cells")
    OUTPUT_TOOLTIPS = (
        "One labelled grid per prompt (batch of prompts; rows: checkpoint step, columns: strength), values 0..1.",
        "Every cell (prompt by prompt, row by row, left to right), width x height each, values 0..1.",
    )
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model the LoRA was trained on (LoRAs already applied to it stay on in every cell)."}),
                "lora": ("FLUX2_LORA", {"tooltip": "The run to compare: Train LoRA's lora output (launch run or attach); its run folder's checkpoints are the rows."}),
                "checkpoints": ("STRING", {"default": "all", "tooltip": "Rows: 'all' (every checkpoint that kept a LoRA file, then the final LoRA) or comma-separated steps and 'final', e.g. 500, 1000, final."}),
                "strengths": ("STRING", {"default": DEFAULT_STRENGTHS, "tooltip": "Columns: comma-separated LoRA strengths between -10 and 10; 0 is the model without the LoRA, 1 the LoRA as trained."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Width of each cell in pixels (multiple of 16)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16, "tooltip": "Height of each cell in pixels (multiple of 16)."}),
                "steps": ("INT", {"default": PIPELINE_STEPS, "min": 1, "max": 200, "step": 1, "tooltip": "Denoising steps per cell: 28-50 for FLUX.2-dev and klein base, 4 for a step-distilled klein."}),
                "guidance": ("FLOAT", {"default": PIPELINE_GUIDANCE, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01, "tooltip": "As FLUX.2 Sample's guidance: FLUX.2-dev's guidance embedding value, or klein base's CFG scale."}),
                # Fixed by default: the grid is re-rendered to compare, not to vary the noise.
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "step": 1, "control_after_generate": False, "tooltip": "Noise seed, the same for every cell."}),
            },
            "optional": {
                "positive": ("CONDITIONING", {"tooltip": "Prompts from Mistral Encode (FLUX.2): each entry (and each batch row) is one prompt and one grid."}),
                "prompts": ("STRING", {"multiline": True, "default": "", "tooltip": "More prompts as text, one per line (encoded with the model's text encoder, cached on disk); after those of positive."}),
                "negative": ("CONDITIONING", {"tooltip": "FLUX.2 [klein] base only: the negative prompt for classifier-free guidance, as FLUX.2 Sample's negative."}),
            },
        }

    def render(self, model, lora, checkpoints: str, strengths: str, width: int, height: int, steps: int,
               guidance: float, seed: int, positive=None, prompts: str = "", negative=None):
        import torch

        from ..trainer.grid import compose_grid, parse_strengths, select_rows, strength_label
        from ..trainer.inference import LoraRef
        from ..trainer.sampling import check_size, check_steps

        if not getattr(lora, "path", ""):
            raise ValueError("LoRA Grid: the lora input has no file (Train LoRA ran in export mode); train or attach "
                             "first.")
        check_size(width=width, height=height)
        check_steps(steps, name="steps")
        columns = parse_strengths(strengths, input_name="strengths")
        rows = select_rows(checkpoints, final_lora=lora.path, input_name="checkpoints")
        negative_embeds = None if negative is None else conditioning_tensor(negative, input_name="negative")
        titles, embeds = grid_prompts(model, positive=positive, prompts=prompts)
        total = len(embeds) * len(rows) * len(columns)
        log.info("LoRA Grid: %d prompt(s) x %d checkpoint(s) x %d strength(s) = %d cells", len(embeds), len(rows),
                 len(columns), total)
        progress = comfy_bridge.Progress(total * steps, label="LoRA Grid")
        cells = []
        for prompt in embeds:
            for row in rows:
                for strength in columns:
                    comfy_bridge.check_interrupted()  # Cancel between cells
                    done = len(cells) * steps
                    cells.append(render_images(
                        model.with_lora(LoraRef(path=str(row.path), strength=strength)), prompt_embeds=prompt,
                        width=width, height=height, steps=steps, guidance=guidance, seed=seed,
                        negative_prompt_embeds=negative_embeds,
                        callback=lambda i, _total, done=done: progress.update_absolute(done + i + 1))[0])
        per_grid = len(rows) * len(columns)
        grids = [compose_grid(torch.stack(cells[n * per_grid:(n + 1) * per_grid]), title=title,
                              row_labels=[r.label for r in rows], column_labels=[strength_label(s) for s in columns])[0]
                 for n, title in enumerate(titles)]
        return (torch.stack(grids), torch.stack(cells))


def grid_prompts(model, *, positive, prompts: str) -> tuple[list[str], list]:
    """(title, embeddings (1, tokens, features)) of each prompt: positive's entries and batch rows, then the text
    lines of prompts (encoded through the text cache, before the transformer loads)."""
    from ..trainer.inference import encode_prompts_cached

    titles, embeds = [], []
    if positive is not None:
        if not isinstance(positive, (list, tuple)) or not positive:
            raise ValueError("LoRA Grid: positive is not a CONDITIONING ([[tensor, {}], ...]).")
        for entry in positive:
            tensor = conditioning_tensor([entry], input_name="positive")
            for row in tensor.split(1):
                titles.append(f"prompt {len(titles) + 1}")
                embeds.append(row)
    lines = [line.strip() for line in str(prompts or "").splitlines() if line.strip()]
    if lines:
        encoded, truncated = encode_prompts_cached(model, lines, cache_dir=text_cache_dir(),
                                                   device=str(comfy_bridge.torch_device()))
        for line, row, cut in zip(lines, encoded.split(1), truncated):
            if cut:
                log.warning("LoRA Grid: prompt %r is longer than 512 tokens and was truncated.", line[:60])
            titles.append(line)
            embeds.append(row)
    if not embeds:
        raise ValueError("LoRA Grid: no prompt; connect positive (Mistral Encode) or type prompts, one per line.")
    return titles, embeds


NODE_CLASS_MAPPINGS = {
    "Flux2LoraGrid": Flux2LoraGrid,
}
