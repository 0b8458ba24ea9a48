"""LoRA Grid's pure parts (trainer/grid.py): strengths and checkpoints chosen by text, and the labelled composition."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer import checkpoint
from flux2_lora_pack.trainer.grid import compose_grid, parse_strengths, select_rows, strength_label


def test_strengths_are_parsed_in_order_and_bad_ones_name_the_widget():
    assert parse_strengths("0, 0.5,1.0 , 1.25,") == [0.0, 0.5, 1.0, 1.25]
    assert parse_strengths("-1") == [-1.0]
    for text, match in [("", "strengths is empty"), ("0, x", r"strengths: 'x' is not a number"),
                        ("0, 11", r"strengths: '11' is outside \[-10, 10\]"), ("nan", "outside"),
                        ("1, 1.0", r"strengths: '1.0' is given twice")]:
        with pytest.raises(ValueError, match=match):
            parse_strengths(text)


def _lora(path: Path, steps: int) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"steps": json.dumps(steps)})
    return path


def _run(tmp_path: Path, steps_with_lora: list[int], steps_without: list[int] = ()) -> Path:
    for step in [*steps_with_lora, *steps_without]:
        lora = step in steps_with_lora
        checkpoint.save_checkpoint(tmp_path, step=step, tensors={"lora/x": torch.zeros(1)}, meta={}, total_limit=None,
                                   extra_files=(lambda folder, s=step: _lora(folder / "my.safetensors", s)) if lora
                                   else None)
    return _lora(tmp_path / "my.safetensors", 6)


def test_checkpoints_are_chosen_by_step_or_all(tmp_path):
    final = _run(tmp_path, [2, 4, 6], steps_without=[1])
    rows = select_rows("all", final_lora=final)
    # checkpoint-6 is the final LoRA (shown once); checkpoint-1 holds no LoRA file (an older run's).
    assert [(r.label, r.step, r.path) for r in rows] == [
        ("step 2", 2, tmp_path / "checkpoint-2" / "my.safetensors"),
        ("step 4", 4, tmp_path / "checkpoint-4" / "my.safetensors"),
        ("final (step 6)", 6, final)]
    assert [r.label for r in select_rows("final, checkpoint-4 ,2", final_lora=final)] == ["final (step 6)", "step 4",
                                                                                          "step 2"]
    for text, match in [("3", r"checkpoints: '3' is not 'all', 'final' or a checkpoint step .*checkpoints: 2, 4, 6"),
                        ("1", "'1' is not"), (" , ", "checkpoints is empty"), ("4, 4", "'4' is given twice"),
                        ("all, 2", "'all' is not")]:
        with pytest.raises(ValueError, match=match):
            select_rows(text, final_lora=final)


def test_grid_places_every_cell_unchanged_below_and_right_of_its_labels():
    rows, columns, h, w = 2, 3, 40, 56
    cells = torch.rand(rows * columns, h, w, 3, generator=torch.Generator().manual_seed(0))
    row_labels = ["step 500", "final (step 1000)"]
    column_labels = [strength_label(s) for s in (0.0, 0.5, 1.25)]
    assert column_labels == ["strength 0", "strength 0.5", "strength 1.25"]
    grid, layout = compose_grid(cells, row_labels=row_labels, column_labels=column_labels, title="a red square")
    assert tuple(grid.shape) == (layout.size[1], layout.size[0], 3) and grid.dtype == cells.dtype
    assert layout.label_width > 0 and layout.header_height > 0 and layout.title_height > 0
    boxes = []
    for index in range(rows * columns):
        left, top = layout.cell_box(index // columns, index % columns)
        boxes.append((left, top))
        assert left >= layout.label_width and top >= layout.title_height + layout.header_height
        assert torch.equal(grid[top:top + h, left:left + w], cells[index])
    # Row-major, left to right then top to bottom, without overlaps; the canvas ends one gap after the last cell.
    assert boxes == sorted(boxes, key=lambda b: (b[1], b[0]))
    assert layout.column_width >= w  # a column label wider than the cells widens its column
    assert boxes[1][0] - boxes[0][0] == layout.column_width + layout.gap
    assert boxes[columns][1] - boxes[0][1] == h + layout.gap
    assert layout.size == (boxes[-1][0] + layout.column_width + layout.gap, boxes[-1][1] + h + layout.gap)
    # The labels are drawn: the title on top, dark pixels above each column and left of each row, none elsewhere.
    dark = grid.mean(dim=-1) < 0.5
    assert dark[:layout.title_height].any()
    header = slice(layout.title_height, layout.title_height + layout.header_height)
    for column in range(columns):
        left = boxes[column][0]
        assert dark[header, left:left + layout.column_width].any()
    for row in range(rows):
        top = boxes[row * columns][1]
        assert dark[top:top + h, :layout.label_width].any()
    assert not dark[header, layout.size[0] - layout.gap:].any()
    untitled = compose_grid(cells, row_labels=row_labels, column_labels=column_labels)[1]
    assert untitled.title_height == 0 and untitled.size[1] == layout.size[1] - layout.title_height


def test_grid_refuses_cells_that_do_not_match_the_labels():
    with pytest.raises(ValueError, match=r"\(5, 8, 8, 3\) cells for 2 x 3 labels"):
        compose_grid(torch.zeros(5, 8, 8, 3), row_labels=["a", "b"], column_labels=["1", "2", "3"])
