"""trainer/tread.py: token selection (pure), routing through the blocks, and TREAD in the training forward."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer import blocks, tread
from flux2_lora_pack.trainer.config import TreadConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import NUM_BLOCKS, diffusers_forward, tiny_inputs, tiny_transformer, with_block_forward  # noqa: E402

# The tiny model: blocks 0-1 are double blocks, 2-4 single blocks. Route 1..3 spans the boundary.
SPANNING = tread.Route(start=1, end=3, selection_ratio=0.5)


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------ pure selection


@pytest.mark.parametrize("tokens, ratio, kept", [(16, 0.0, 16), (16, 0.5, 8), (10, 0.25, 8), (4096, 0.5, 2048),
                                                 (1, 0.9, 1), (7, 0.99, 1)])
def test_kept_count_drops_floor_of_ratio_times_tokens(tokens, ratio, kept):
    assert tread.kept_count(tokens, selection_ratio=ratio) == kept


def test_select_tokens_is_a_sorted_subset_drawn_per_sample_from_its_generator():
    chosen = tread.select_tokens(64, selection_ratio=0.75, generators=generators(1, 2, 3))
    assert chosen.shape == (3, 16) and chosen.dtype == torch.int64
    for row in chosen:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= int(row.min()) and int(row.max()) < 64
    assert len({tuple(r.tolist()) for r in chosen}) == 3  # every sample its own subset
    again = tread.select_tokens(64, selection_ratio=0.75, generators=generators(1, 2, 3))
    assert torch.equal(chosen, again)
    # A sample's subset depends on its own generator only, not on the rest of the batch.
    alone = tread.select_tokens(64, selection_ratio=0.75, generators=generators(2))
    assert torch.equal(alone[0], chosen[1])


def test_select_tokens_rejects_a_ratio_of_one():
    with pytest.raises(ValueError, match=r"selection_ratio must be in \[0, 1\)"):
        tread.select_tokens(8, selection_ratio=1.0, generators=generators(0))


def test_plan_routes_resolves_simpletuner_indices_and_orders_routes():
    config = TreadConfig.from_dict({"routes": [
        {"selection_ratio": 0.25, "start_layer_idx": -1, "end_layer_idx": -1},
        {"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -3},
    ]})
    assert tread.plan_routes(config, num_blocks=NUM_BLOCKS) == (
        tread.Route(start=1, end=2, selection_ratio=0.5), tread.Route(start=4, end=4, selection_ratio=0.25))
    # FLUX.2-dev: (2, -2) routes blocks 2..54 of 56, across the double/single boundary at 8.
    dev = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]})
    assert tread.plan_routes(dev, num_blocks=56) == (tread.Route(start=2, end=54, selection_ratio=0.5),)


def test_plan_routes_refuses_routes_outside_the_model_or_overlapping():
    config = TreadConfig.from_dict({"routes": [
        {"selection_ratio": 0.3, "start_layer_idx": 1, "end_layer_idx": 3},
        {"selection_ratio": 0.7, "start_layer_idx": -4, "end_layer_idx": -1},
    ]})
    assert tread.plan_routes(config, num_blocks=56) == (
        tread.Route(start=1, end=3, selection_ratio=0.3), tread.Route(start=52, end=55, selection_ratio=0.7))
    with pytest.raises(ValueError, match=r"tread_config routes overlap: blocks 1\.\.3 and 1\.\.4"):
        tread.plan_routes(config, num_blocks=5)
    with pytest.raises(ValueError, match=r"tread_config\.routes\[0\]: blocks 1\.\.3 resolve to 1\.\.3, outside"):
        tread.plan_routes(config, num_blocks=3)
    mixed = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]})
    with pytest.raises(ValueError, match=r"resolve to 2\.\.1"):
        tread.plan_routes(mixed, num_blocks=3)


def test_plan_routes_warns_above_half(caplog):
    high = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.75, "start_layer_idx": 0, "end_layer_idx": 1}]})
    half = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0, "end_layer_idx": 1}]})
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.tread"):
        tread.plan_routes(half, num_blocks=NUM_BLOCKS)
        assert caplog.records == []
        tread.plan_routes(high, num_blocks=NUM_BLOCKS)
    assert len(caplog.records) == 1 and "SKIPPED" in caplog.records[0].getMessage()


def test_draw_routing_never_drops_reference_tokens():
    routes = (tread.Route(start=0, end=0, selection_ratio=0.5), tread.Route(start=2, end=4, selection_ratio=0.25))
    routing = tread.draw_routing(routes, num_target_tokens=16, num_image_tokens=20, generators=generators(5, 6))
    assert [k.shape for k in routing.kept] == [(2, 8 + 4), (2, 12 + 4)]
    for kept in routing.kept:
        assert kept[:, -4:].tolist() == [[16, 17, 18, 19]] * 2
        assert int(kept[:, :-4].max()) < 16
    assert routing.route_starting_at(2) == 1 and routing.route_ending_at(4) == 1 and routing.route_starting_at(1) is None


def test_gather_then_scatter_puts_tokens_back():
    full = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    index = torch.tensor([[0, 4], [2, 5]])
    kept = tread.gather_tokens(full, index)
    assert kept[1, 0].tolist() == full[1, 2].tolist() and kept[0, 1].tolist() == full[0, 4].tolist()
    assert torch.equal(tread.scatter_tokens(full, kept, index), full)
    moved = tread.scatter_tokens(torch.zeros_like(full), kept + 100, index)
    assert moved[1, 5].tolist() == (full[1, 5] + 100).tolist() and moved[1, 0].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- routing through blocks


class _RecordingDouble(torch.nn.Module):
    """Stands in for a double block: adds `step` to both streams and records what it got."""

    def __init__(self, step: float, log: list) -> None:
        super().__init__()
        self.step, self.log = step, log

    def forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb=None,
                joint_attention_kwargs=None):
        self.log.append((hidden_states.clone(), encoder_hidden_states.clone(), image_rotary_emb))
        return encoder_hidden_states + self.step, hidden_states + self.step


class _RecordingSingle(torch.nn.Module):
    def __init__(self, step: float, log: list) -> None:
        super().__init__()
        self.step, self.log = step, log

    def forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                joint_attention_kwargs=None):
        self.log.append((hidden_states.clone(), None, image_rotary_emb))
        return hidden_states + self.step


def test_routed_tokens_skip_the_route_and_come_back_in_order():
    """Identity-like blocks (+1 each, block 0 adds 0): after route 1..3 (double 1, single 2 and 3) a kept
    image token went through 3 blocks, a routed-around one through none, text through all; every token is
    back at its place, and inside the route each sample saw its own kept tokens with their own RoPE rows."""
    model = tiny_transformer()
    logs: list[list] = [[] for _ in range(NUM_BLOCKS)]
    model.transformer_blocks = torch.nn.ModuleList([_RecordingDouble(0.0, logs[0]), _RecordingDouble(1.0, logs[1])])
    model.single_transformer_blocks = torch.nn.ModuleList([_RecordingSingle(s, logs[i + 2])
                                                           for i, s in enumerate((1.0, 1.0, 0.0))])
    inputs = tiny_inputs(batch=2)  # 16 target + 4 reference tokens, 7 text tokens
    routing = tread.draw_routing((SPANNING,), num_target_tokens=16, num_image_tokens=20, generators=generators(7, 8))
    with torch.no_grad():
        blocks.block_forward(model, **inputs, routing=routing)
    img0, txt0, full_rotary = logs[0][0]
    kept = routing.kept[0]
    assert kept.shape == (2, 8 + 4) and not torch.equal(kept[0], kept[1])
    for block in (1, 2, 3):  # inside the route: text + each sample's kept image tokens, in kept order
        hidden, text, rotary = logs[block][0]
        image = hidden if text is not None else hidden[:, 7:]
        assert image.shape == (2, 12, 256)
        shift = 0.0 if block == 1 else float(block - 1)
        torch.testing.assert_close(image, tread.gather_tokens(img0, kept) + shift, rtol=0, atol=1e-6)
        for table, full in zip(rotary, full_rotary):
            assert table.shape == (2, 7 + 12, 128)
            for b in range(2):
                torch.testing.assert_close(table[b], torch.cat([full[:7], full[7:][kept[b]]]), rtol=0, atol=0)
    joint_after, _, rotary_after = logs[4][0]
    assert all(t.shape == (7 + 20, 128) for t in rotary_after)  # full table again after the route
    torch.testing.assert_close(joint_after[:, :7], txt0 + 3.0, rtol=0, atol=1e-6)
    expected = img0.clone()
    for b in range(2):
        expected[b, kept[b]] += 3.0
    torch.testing.assert_close(joint_after[:, 7:], expected, rtol=0, atol=1e-6)
    # Routed-around tokens are bit-for-bit their pre-route activations.
    dropped = [sorted(set(range(20)) - set(kept[b].tolist())) for b in range(2)]
    for b in range(2):
        assert torch.equal(joint_after[b, 7:][dropped[b]], img0[b, dropped[b]])


def test_route_inside_the_double_blocks_only():
    model = tiny_transformer()
    logs: list[list] = [[] for _ in range(NUM_BLOCKS)]
    model.transformer_blocks = torch.nn.ModuleList([_RecordingDouble(1.0, logs[0]), _RecordingDouble(0.0, logs[1])])
    model.single_transformer_blocks = torch.nn.ModuleList([_RecordingSingle(0.0, logs[i + 2]) for i in range(3)])
    route = tread.Route(start=0, end=0, selection_ratio=0.75)
    routing = tread.draw_routing((route,), num_target_tokens=16, num_image_tokens=16, generators=generators(3))
    inputs = tiny_inputs(batch=1, reference=False)
    with torch.no_grad():
        blocks.block_forward(model, **inputs, routing=routing)
    assert logs[0][0][0].shape == (1, 4, 256)
    img_after = logs[1][0][0]
    img_before = model.x_embedder(inputs["hidden_states"])
    expected = img_before.clone()
    expected[0, routing.kept[0][0]] += 1.0
    torch.testing.assert_close(img_after, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ TREAD in the training forward


def routed_model(*routes: tread.Route) -> torch.nn.Module:
    return with_block_forward(tiny_transformer().train(), routes=routes)


def test_ratio_zero_equals_no_tread():
    inputs = tiny_inputs()
    plain = with_block_forward(tiny_transformer().train())
    expected = plain(**inputs, return_dict=False)[0]
    model = routed_model(tread.Route(start=0, end=NUM_BLOCKS - 1, selection_ratio=0.0))
    got = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_tread_changes_the_output_and_is_deterministic_per_generator_seed():
    inputs = tiny_inputs()
    model = routed_model(SPANNING)
    first = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
    again = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
    other = model(**inputs, return_dict=False, tread_generators=generators(3, 4), num_target_tokens=16)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, diffusers_forward(model, inputs))


def test_batch_equals_each_sample_alone():
    """Per-sample selections and RoPE rows: sample b of a batch of 2 equals sample b run alone."""
    inputs = tiny_inputs(batch=2)
    model = routed_model(SPANNING)
    with torch.no_grad():
        batched = model(**inputs, return_dict=False, tread_generators=generators(11, 12), num_target_tokens=16)[0]
        for b, seed in enumerate((11, 12)):
            alone = {k: v[b : b + 1] for k, v in inputs.items()}
            out = model(**alone, return_dict=False, tread_generators=generators(seed), num_target_tokens=16)[0]
            torch.testing.assert_close(batched[b : b + 1], out, rtol=0, atol=1e-5)


def test_gradients_reach_the_lora_weights_of_routed_blocks():
    model = routed_model(SPANNING)
    inputs = tiny_inputs()
    out = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
    out.square().mean().backward()
    routed = ["transformer_blocks.1."] + [f"single_transformer_blocks.{i}." for i in (0, 1)]
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n and any(n.startswith(r) for r in routed)}
    assert len(lora) == 2 * 12 + 2 * 2 * 2  # double block: 12 adapted layers; single: 2; A and B each
    for name, param in lora.items():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_eval_mode_never_routes():
    inputs = tiny_inputs()
    model = routed_model(SPANNING).eval()
    with torch.no_grad():
        got = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
        torch.testing.assert_close(got, diffusers_forward(model, inputs), rtol=0, atol=1e-6)


def test_training_forward_without_generators_is_refused():
    model = routed_model(SPANNING)
    with pytest.raises(ValueError, match="tread_generators"):
        model(**tiny_inputs())


def test_tread_with_checkpointing_gives_the_same_loss_and_grads():
    inputs = tiny_inputs()
    results = []
    for every in (None, 1):
        model = with_block_forward(tiny_transformer().train(), routes=(SPANNING,), checkpoint_every=every)
        out = model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=16)[0]
        loss = out.square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)


def test_model_tread_comes_from_the_plan_it_is_given():
    """train_step hands tread_generators to the forward when Model.tread: that reads the plan build_model keeps
    (apply_block_forward's result), never the module."""
    from flux2_lora_pack.trainer.model import Model

    module = tiny_transformer().train()
    plan = blocks.apply_block_forward(module, routes=(SPANNING,))
    common = dict(module=module, inner=module, compute_dtype=torch.float32, hidden_size=256)
    assert Model(**common, block_forward=plan).tread
    assert not Model(**common, block_forward=blocks.BlockForwardPlan(checkpoint_every=1, routes=())).tread
    assert not Model(**common).tread


def test_build_model_wires_tread_and_the_checkpoint_interval(tiny_model_dir):
    from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ParallelismConfig
    from flux2_lora_pack.trainer.model import build_model
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.parallelize import DistEnv

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    lora = LoraConfig(rank=4, alpha=4.0, dropout=0.0, init="default", target="all")
    config = TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]})
    folder = inspect_model_folder(tiny_model_dir)
    cases = [(dict(gradient_checkpointing=True, gradient_checkpointing_interval=2), config, 2, (SPANNING,)),
             (dict(gradient_checkpointing=True), None, 1, ()),
             (dict(gradient_checkpointing=False, gradient_checkpointing_interval=3), None, None, ())]
    for memory, tread_config, every, routes in cases:
        model = build_model(folder, lora=lora, memory=MemoryConfig(mixed_precision="no", **memory),
                            parallelism=ParallelismConfig(distributed="none"), seed=0, env=env, tread=tread_config)
        settings = model.block_forward
        assert (settings.checkpoint_every, settings.routes, model.tread) == (every, routes, bool(routes))
        assert model.module is model.inner and model.inner.training
