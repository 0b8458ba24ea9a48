"""trainer/blocks.py: our block-by-block forward equals diffusers' Flux2Transformer2DModel.forward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from trainer import blocks, tread

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import NUM_BLOCKS, diffusers_forward, tiny_inputs, tiny_transformer  # noqa: E402


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
    same = blocks.apply_block_forward(model)
    assert same is model and isinstance(model, Flux2Transformer2DModel)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-6)


def test_routed_processors_compute_what_diffusers_processors_compute():
    """With every block routed but the model in eval (no routing), only the processors differ."""
    model = tiny_transformer().eval()
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = diffusers_forward(model, inputs)
    blocks.apply_block_forward(model, routes=(tread.Route(start=0, end=NUM_BLOCKS - 1, selection_ratio=0.5),))
    kinds = [type(b.attn.processor) for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    assert kinds == [blocks.RoutedAttnProcessor] * 2 + [blocks.RoutedParallelSelfAttnProcessor] * 3
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], expected, rtol=0, atol=1e-6)


def test_per_sample_rotary_table_equals_each_sample_with_its_own_table():
    """The routed processors with a (B, S, D) table: sample b equals sample b alone with its (S, D) rows."""
    model = tiny_transformer()
    torch.manual_seed(3)
    cos, sin = (torch.randn(2, 9, 128) for _ in range(2))
    for attn, args in ((model.transformer_blocks[0].attn, (torch.randn(2, 5, 256), torch.randn(2, 4, 256))),
                       (model.single_transformer_blocks[0].attn, (torch.randn(2, 9, 256),))):
        processor = (blocks.RoutedAttnProcessor() if len(args) == 2 else blocks.RoutedParallelSelfAttnProcessor())
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
    model = blocks.apply_block_forward(tiny_transformer().train())
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
    model = blocks.apply_block_forward(tiny_transformer())
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
