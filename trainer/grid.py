"""LoRA Grid: which LoRA files of a run to compare, the strengths to try, and the labelled grid image.

A run folder holds the final <output_name>.safetensors and, in each checkpoint-<step>/ folder, the LoRA of that step
under the same name (trainer/loop.py save_training_checkpoint). The grid has one row per LoRA (checkpoint step) and
one column per strength; the cells are pasted unchanged into a canvas whose left column and top row carry labels
drawn with Pillow's default font. No ComfyUI import here: the LoRA Grid node (nodes/grid_nodes.py) renders the cells.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import list_checkpoints

if TYPE_CHECKING:
    import torch

FINAL = "final"
ALL = "all"
MAX_STRENGTH = 10.0
"""The same bound as Apply LoRA's strength widget."""
_STEP = re.compile(r"^(?:checkpoint-)?(\d+)$")


@dataclass(frozen=True, kw_only=True, slots=True)
class GridRow:
    """One row of the grid: a LoRA file of the run."""

    label: str
    """What the row is called on the grid: "step 500", or "final (step 1000)"."""
    path: Path
    step: int | None
    """The training step the file holds (None for a final file without a steps entry in its header)."""


def parse_strengths(text: str, *, input_name: str = "strengths") -> list[float]:
    """Comma-separated LoRA strengths ("0, 0.5, 1.0, 1.25"), each finite, within +-MAX_STRENGTH and given once."""
    values: list[float] = []
    for token in (t.strip() for t in str(text).split(",")):
        if not token:
            continue
        try:
            value = float(token)
        except ValueError:
            raise ValueError(f"{input_name}: {token!r} is not a number; give comma-separated strengths such as "
                             "0, 0.5, 1.0, 1.25.") from None
        if not math.isfinite(value) or abs(value) > MAX_STRENGTH:
            raise ValueError(f"{input_name}: {token!r} is outside [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]; "
                             "1.0 is the LoRA as trained, 0 turns it off.")
        if value in values:
            raise ValueError(f"{input_name}: {token!r} is given twice; list each strength once.")
        values.append(value)
    if not values:
        raise ValueError(f"{input_name} is empty; give comma-separated strengths such as 0, 0.5, 1.0, 1.25.")
    return values


def _file_steps(path: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        raw = (fh.metadata() or {}).get("steps")
    try:
        return int(json.loads(raw)) if raw is not None else None
    except (TypeError, ValueError):
        return None


def checkpoint_loras(run_dir: Path, *, lora_name: str) -> dict[int, Path]:
    """step -> the LoRA file of each complete checkpoint of the run that holds one (older runs' checkpoints do not)."""
    return {step: folder / lora_name for step, folder in list_checkpoints(run_dir) if (folder / lora_name).is_file()}


def select_rows(text: str, *, final_lora: Path, input_name: str = "checkpoints") -> list[GridRow]:
    """The rows `text` asks for: "all" (every checkpoint holding a LoRA, then the final LoRA), or a comma list of
    steps ("500", "checkpoint-500") and "final", in the order given."""
    final_lora = Path(final_lora)
    run_dir, lora_name = final_lora.parent, final_lora.name
    available = checkpoint_loras(run_dir, lora_name=lora_name)
    final_steps = _file_steps(final_lora)
    final_row = GridRow(label=FINAL if final_steps is None else f"{FINAL} (step {final_steps})", path=final_lora,
                        step=final_steps)
    tokens = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if tokens == [ALL]:
        # The last checkpoint of a run that ends on a checkpoint step is the final LoRA: shown once, as final.
        return [GridRow(label=f"step {s}", path=p, step=s) for s, p in available.items() if s != final_steps] \
            + [final_row]
    if not tokens:
        raise ValueError(f"{input_name} is empty; give 'all' or comma-separated steps such as 500, 1000, final.")
    rows: list[GridRow] = []
    for token in tokens:
        match = _STEP.match(token)
        if token == FINAL:
            row = final_row
        elif match is not None and int(match.group(1)) in available:
            step = int(match.group(1))
            row = GridRow(label=f"step {step}", path=available[step], step=step)
        else:
            have = ", ".join(str(s) for s in available) or "none with a LoRA file"
            raise ValueError(f"{input_name}: {token!r} is not 'all', 'final' or a checkpoint step of {run_dir} "
                             f"(checkpoints: {have}; older runs and rotated checkpoints keep no LoRA file).")
        if row in rows:
            raise ValueError(f"{input_name}: {token!r} is given twice; list each checkpoint once.")
        rows.append(row)
    return rows


def strength_label(strength: float) -> str:
    return f"strength {strength:g}"


@dataclass(frozen=True, kw_only=True, slots=True)
class GridLayout:
    """Where everything goes on the canvas: labels left and on top, cells in row-major order, a gap between."""

    rows: int
    columns: int
    cell_width: int
    cell_height: int
    column_width: int
    """The cell width, or the widest column label's when that is wider (the cell sits at the column's left)."""
    label_width: int
    """Width of the left column with the row labels."""
    header_height: int
    """Height of the row with the column labels."""
    gap: int
    title_height: int = 0
    """Height of the title line above everything (0 without a title)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the canvas."""
        return (self.label_width + self.columns * (self.column_width + self.gap) + self.gap,
                self.title_height + self.header_height + self.rows * (self.cell_height + self.gap) + self.gap)

    def cell_box(self, row: int, column: int) -> tuple[int, int]:
        """(left, top) pixel of a cell."""
        return (self.label_width + self.gap + column * (self.column_width + self.gap),
                self.title_height + self.header_height + self.gap + row * (self.cell_height + self.gap))


def label_font(cell_height: int):
    """Pillow's default font, sized to the cells (Pillow < 10.1 has only its fixed bitmap font)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(10, min(48, cell_height // 12)))
    except (TypeError, OSError):
        return ImageFont.load_default()


def grid_layout(*, rows: int, columns: int, cell_width: int, cell_height: int, row_labels: list[str],
                column_labels: list[str], font, title: str = "") -> GridLayout:
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, cell_height // 32)

    def extent(text: str) -> tuple[int, int]:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_width = max(extent(t)[0] for t in row_labels) + 2 * pad
    header_height = max(extent(t)[1] for t in [*column_labels, *row_labels]) + 2 * pad
    column_width = max(cell_width, max(extent(t)[0] for t in column_labels) + pad)
    title_height = extent(title)[1] + 2 * pad if title else 0
    return GridLayout(rows=rows, columns=columns, cell_width=cell_width, cell_height=cell_height,
                      column_width=column_width, label_width=label_width, header_height=header_height, gap=pad,
                      title_height=title_height)


def compose_grid(cells: torch.Tensor, *, row_labels: list[str], column_labels: list[str],
                 title: str = "") -> tuple[torch.Tensor, GridLayout]:
    """One labelled grid image (H, W, 3) in [0, 1] from cells (rows x columns, h, w, 3) in row-major order; the cells
    are copied exactly (no resampling); title (the prompt) goes on a line above, shortened to fit."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rows, columns = len(row_labels), len(column_labels)
    if cells.ndim != 4 or cells.shape[0] != rows * columns or cells.shape[-1] != 3:
        raise ValueError(f"compose_grid: {tuple(cells.shape)} cells for {rows} x {columns} labels; expected "
                         f"({rows * columns}, height, width, 3).")
    cell_height, cell_width = int(cells.shape[1]), int(cells.shape[2])
    font = label_font(cell_height)
    layout = grid_layout(rows=rows, columns=columns, cell_width=cell_width, cell_height=cell_height,
                         row_labels=row_labels, column_labels=column_labels, font=font, title=title)
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    middle_y = layout.title_height + layout.header_height // 2
    for column, text in enumerate(column_labels):
        left, _ = layout.cell_box(0, column)
        draw.text((left + layout.column_width // 2, middle_y), text, fill="black", font=font, anchor="mm")
    for row, text in enumerate(row_labels):
        _, top = layout.cell_box(row, 0)
        draw.text((layout.gap, top + cell_height // 2), text, fill="black", font=font, anchor="lm")
    if title:
        shown = title
        while shown and draw.textlength(shown, font=font) > layout.size[0] - 2 * layout.gap:
            shown = shown[:-2] + "…" if len(shown) > 1 else ""
        draw.text((layout.gap, layout.title_height // 2), shown, fill="black", font=font, anchor="lm")
    grid = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).to(cells.dtype)
    for index in range(rows * columns):
        left, top = layout.cell_box(index // columns, index % columns)
        grid[top:top + cell_height, left:left + cell_width] = cells[index]
    return grid, layout
