"""trainer/blocks.py: our block-by-block forward equals diffusers' Flux2Transformer2DModel.forward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from flux2_lora_pack.trainer import blocks, tread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import NUM_BLOCKS, diffusers_forward, tiny_inputs, tiny_transformer, with_block_forward  # noqa: E402


def test_block_forward_equals_diffusers_forward():
    model = tiny_transformer().eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = diffusers_forward(model, inputs)
        got = blocks.block_forward(model, **inputs)
    assert got.shape == (2, 16 + 4, 128)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_block_forward_equals_diffusers_forward_with_grad_in_train_mode():
    model = tiny_transformer().train()
    inputs = tiny_inputs(reference=False, batch=1)
    expected = diffusers_forward(model, inputs)
    got = blocks.block_forward(model, **inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_apply_block_forward_keeps_the_module_and_its_state_keys():
    model = tiny_transformer().eval()
    keys = list(model.state_dict())
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = diffusers_forward(model, inputs)
    same = with_block_forward(model)
    assert same is model and isinstance(model, Flux2Transformer2DModel)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-6)


def test_apply_block_forward_assigns_no_class_and_returns_the_plan_its_forward_runs():
    """The forward is an instance attribute over the plan apply_block_forward returns: the class and the
    state-dict keys stay diffusers', and re-applying replaces what the forward does."""
    model = tiny_transformer().train()
    keys = list(model.state_dict())
    route = tread.Route(start=1, end=3, selection_ratio=0.5)
    plan = blocks.apply_block_forward(model, routes=(route,), checkpoint_every=2)
    assert type(model) is Flux2Transformer2DModel
    assert list(model.state_dict()) == keys
    assert plan == blocks.BlockForwardPlan(checkpoint_every=2, routes=(route,)) and plan.tread
    with pytest.raises(ValueError, match="tread_generators"):  # the forward routes by that plan
        model(**tiny_inputs())
    again = blocks.apply_block_forward(model)
    assert again == blocks.BlockForwardPlan(checkpoint_every=None, routes=()) and not again.tread
    assert type(model) is Flux2Transformer2DModel and list(model.state_dict()) == keys
    model(**tiny_inputs())  # no routes now: no generators needed


def test_no_trainer_module_assigns_a_class():
    """The block forward (and everything else in trainer/) keeps module classes; FSDP2's own swap is torch's."""
    import ast

    trainer = Path(blocks.__file__).parent
    found = []
    for path in sorted(trainer.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            found += [f"{path.name}:{node.lineno}" for t in targets
                      if isinstance(t, ast.Attribute) and t.attr == "__class__"]
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1:
                if isinstance(node.args[1], ast.Constant) and node.args[1].value == "__class__":
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []


def test_hooks_added_later_wrap_the_training_forward():
    """A diffusers hook on the root (group offload adds one) wraps our forward; the model still runs it and is
    still recognised as taking reference_timestep, and apply_block_forward now refuses it."""
    from diffusers.hooks import HookRegistry, ModelHook

    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    model = tiny_transformer().eval()
    blocks.apply_block_forward(model)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(Counting(), "counting")
    inputs = tiny_inputs()
    with torch.no_grad():
        got = model(**inputs, return_dict=False, num_target_tokens=16, reference_timestep="zero")[0]
        expected = blocks.block_forward(model, **inputs, num_target_tokens=16, reference_timestep="zero")
    assert calls == [model] and type(model) is Flux2Transformer2DModel
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert blocks.supports_reference_timestep(model)
    with pytest.raises(RuntimeError, match="before diffusers hooks"):
        blocks.apply_block_forward(model)


def test_routed_processors_compute_what_diffusers_processors_compute():
    """With every block routed but the model in eval (no routing), only the processors differ."""
    model = tiny_transformer().eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = diffusers_forward(model, inputs)
    blocks.apply_block_forward(model, routes=(tread.Route(start=0, end=NUM_BLOCKS - 1, selection_ratio=0.5),))
    kinds = [type(b.attn.processor) for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    assert kinds == [tread.RoutedAttnProcessor] * 2 + [tread.RoutedParallelSelfAttnProcessor] * 3
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-6)


def test_per_sample_rotary_table_equals_each_sample_with_its_own_table():
    """The routed processors with a (B, S, D) table: sample b equals sample b alone with its (S, D) rows."""
    model = tiny_transformer()
    torch.manual_seed(3)
    cos, sin = (torch.randn(2, 9, 128) for _ in range(2))
    for attn, args in ((model.transformer_blocks[0].attn, (torch.randn(2, 5, 256), torch.randn(2, 4, 256))),
                       (model.single_transformer_blocks[0].attn, (torch.randn(2, 9, 256),))):
        processor = (tread.RoutedAttnProcessor() if len(args) == 2 else tread.RoutedParallelSelfAttnProcessor())
        with torch.no_grad():
            batched = processor(attn, *args, image_rotary_emb=(cos, sin))
            for b in range(2):
                alone = processor(attn, *(a[b : b + 1] for a in args), image_rotary_emb=(cos[b], sin[b]))
                for x, y in zip(batched if isinstance(batched, tuple) else (batched,),
                                alone if isinstance(alone, tuple) else (alone,)):
                    torch.testing.assert_close(x[b : b + 1], y, rtol=0, atol=1e-6)


def _loss_and_lora_grads(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("every, checkpointed", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3])])
def test_gradient_checkpointing_every_nth_block_gives_the_same_loss_and_grads(monkeypatch, every, checkpointed):
    inputs = tiny_inputs()
    model = with_block_forward(tiny_transformer().train())
    loss, grads = _loss_and_lora_grads(model, inputs)

    seen = []
    real_checkpoint = blocks.checkpoint

    def counting_checkpoint(block, *args, **kwargs):
        seen.append(block)
        return real_checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(blocks, "checkpoint", counting_checkpoint)
    blocks.apply_block_forward(model, checkpoint_every=every)
    loss_ckpt, grads_ckpt = _loss_and_lora_grads(model, inputs)
    all_blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    assert [all_blocks.index(b) for b in seen] == checkpointed
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert set(grads_ckpt) == set(grads) and len(grads) == 60
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=name)

    seen.clear()
    with torch.no_grad():
        model(**inputs)
    assert seen == []  # nothing to recompute without gradients


def test_rejects_inference_only_options_and_bad_interval():
    model = with_block_forward(tiny_transformer())
    inputs = tiny_inputs(batch=1)
    with pytest.raises(ValueError, match="KV-cache"):
        model(**inputs, kv_cache_mode="extract", num_ref_tokens=4)
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        model(**inputs, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="gradient_checkpointing_interval must be >= 1"):
        blocks.apply_block_forward(model, checkpoint_every=0)


def test_refuses_a_model_that_already_has_diffusers_hooks():
    from diffusers.hooks import HookRegistry

    model = tiny_transformer()
    HookRegistry.check_if_exists_or_initialize(model)
    with pytest.raises(RuntimeError, match="before diffusers hooks"):
        blocks.apply_block_forward(model)
