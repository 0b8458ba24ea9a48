"""LoRA Grid (FLUX.2) on the tiny model: a trained run's checkpoints x strengths, rendered as FLUX.2 Sample renders."""

from __future__ import annotations

import importlib

import pytest
import torch

SIZE = dict(width=64, height=64, steps=2, guidance=4.0, seed=7)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, square_dataset, tmp_path_factory, runs):
    out = tmp_path_factory.mktemp("grid_run") / "run"
    # checkpoint-2 and checkpoint-4; the final LoRA is step 4's.
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=4, checkpointing_steps=2,
                                learning_rate=1e-2))
    return out


@pytest.mark.slow  # ~55 s: a 4-step training run, then 8 renders; the composition is unit-tested in test_lora_grid.py
def test_grid_renders_checkpoints_by_strengths_and_cancels_between_cells(pack, comfy_root, model_spec, trained_run,
                                                                        monkeypatch):
    grid_nodes = importlib.import_module(f"{pack.__name__}.nodes.grid_nodes")
    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    train_nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    lora = train_nodes.TrainedLora(path=str(trained_run / "lora.safetensors"))
    (positive,) = model_nodes.Flux2MistralEncode().encode(model_spec, "a red square on a white background")
    node = grid_nodes.Flux2LoraGrid()

    for bad, match in [({"strengths": "0, big"}, "strengths: 'big' is not a number"),
                       ({"checkpoints": "3"}, r"checkpoints: '3' is not .*checkpoints: 2, 4"),
                       ({"positive": None}, "no prompt")]:
        with pytest.raises(ValueError, match=match):
            node.render(model_spec, lora, **{"checkpoints": "all", "strengths": "0, 1", "positive": positive,
                                             **SIZE, **bad})

    grid, cells = node.render(model_spec, lora, checkpoints="all", strengths="0, 1.0", positive=positive, **SIZE)
    assert tuple(cells.shape) == (4, 64, 64, 3) and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[1] > 2 * 64 and grid.shape[2] > 2 * 64  # two rows, two columns and their labels
    # Rows: step 2, final (step 4); columns: strength 0, 1. Strength 0 is the model without the LoRA: FLUX.2 Sample's
    # picture with the same seed, in every row.
    (plain,) = model_nodes.Flux2Sample().sample(model_spec, positive, **SIZE)
    torch.testing.assert_close(cells[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(cells[2], plain[0], rtol=0, atol=0)
    assert not torch.equal(cells[1], cells[0]) and not torch.equal(cells[3], cells[2])  # the LoRA acts
    assert not torch.equal(cells[1], cells[3])  # and step 2's LoRA is not step 4's
    # A prompt typed as text is encoded as Mistral Encode encodes it: the same cell.
    text_grid, text_cells = node.render(model_spec, lora, checkpoints="final", strengths="1", **SIZE,
                                        prompts="\n  a red square on a white background  \n")
    assert tuple(text_cells.shape) == (1, 64, 64, 3) and text_grid.shape[0] == 1
    torch.testing.assert_close(text_cells[0], cells[3], rtol=0, atol=0)

    rendered = []
    render = grid_nodes.render_images

    def counting(*args, **kwargs):
        rendered.append(kwargs["prompt_embeds"])
        return render(*args, **kwargs)

    class Cancelled(Exception):
        pass

    def check_interrupted():
        if rendered:
            raise Cancelled

    monkeypatch.setattr(grid_nodes, "render_images", counting)
    monkeypatch.setattr(bridge, "check_interrupted", check_interrupted)
    with pytest.raises(Cancelled):
        node.render(model_spec, lora, checkpoints="2, final", strengths="0.5, 1", positive=positive, **SIZE)
    assert len(rendered) == 1  # the first cell ran to its end; Cancel stopped the grid before the second
