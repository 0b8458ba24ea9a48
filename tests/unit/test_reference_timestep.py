"""reference_timestep: reference-image tokens modulated as at timestep 0 ("zero") or with the sample's ("shared").

The tiny model (tests/block_tools.py): 2 double + 3 single blocks, hidden 256; tiny_inputs has 16 target tokens,
4 reference tokens (one 2x2 reference image) and 7 text tokens, batch 2 with a different timestep per sample.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers import transformer_flux2

from flux2_lora_pack.trainer import blocks, flux2, sampling, tread
from flux2_lora_pack.trainer.config import ObjectiveConfig, TrainConfig
from flux2_lora_pack.trainer.objective import (
    flow_matching_loss,
    prepare_batch,
    sample_generators,
    warn_unused_reference_timestep,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import NUM_BLOCKS, tiny_inputs, tiny_transformer, with_block_forward  # noqa: E402

TARGET, REFS, TEXT = 16, 4, 7
SPANNING = tread.Route(start=1, end=3, selection_ratio=0.5)  # double block 1, single blocks 2 and 3


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def zero(model: torch.nn.Module, inputs: dict, **kwargs) -> torch.Tensor:
    return blocks.block_forward(model, **inputs, num_target_tokens=TARGET, reference_timestep="zero", **kwargs)


def reference_modulations(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """(B, C) modulations at the sample's timestep and at timestep 0 (same guidance), computed directly."""
    guidance = inputs["guidance"] * 1000
    temb_t = model.time_guidance_embed(inputs["timestep"] * 1000, guidance)
    temb_0 = model.time_guidance_embed(torch.zeros_like(inputs["timestep"]), guidance)
    return {"img_t": model.double_stream_modulation_img(temb_t), "img_0": model.double_stream_modulation_img(temb_0),
            "single_t": model.single_stream_modulation(temb_t), "single_0": model.single_stream_modulation(temb_0)}


# ------------------------------------------------------------------------------ against a reference


def test_zero_equals_diffusers_extract_mode():
    """diffusers' KV-cache "extract" forward blends the same per-token modulations (ref_fixed_timestep=0, the
    references FIRST, guidance unchanged). Its causal attention (references attend only to themselves) lives in
    the KV processors (Flux2KVAttnProcessor), which the model does not have: its default processors ignore the
    KV arguments and attend fully, as training does. Its target outputs must equal ours, tokens reordered."""
    model = tiny_transformer().eval()
    assert {type(b.attn.processor) for b in model.transformer_blocks} == {transformer_flux2.Flux2AttnProcessor}
    assert {type(b.attn.processor) for b in model.single_transformer_blocks} == {
        transformer_flux2.Flux2ParallelSelfAttnProcessor}
    inputs = tiny_inputs()
    assert inputs["timestep"][0] != inputs["timestep"][1]
    refs_first = dict(inputs,
                      hidden_states=torch.cat([inputs["hidden_states"][:, TARGET:], inputs["hidden_states"][:, :TARGET]], 1),
                      img_ids=torch.cat([inputs["img_ids"][:, TARGET:], inputs["img_ids"][:, :TARGET]], 1))
    with torch.no_grad():
        expected = Flux2Transformer2DModel.forward(model, **refs_first, return_dict=False, kv_cache_mode="extract",
                                                   num_ref_tokens=REFS, ref_fixed_timestep=0.0)[0]
        got = zero(model, inputs)
        shared = blocks.block_forward(model, **inputs)
    assert expected.shape == (2, TARGET, 128)
    # Only the attention's summation order differs (references last here, first there): float32 rounding.
    torch.testing.assert_close(got[:, :TARGET], expected, rtol=0, atol=2e-6)
    assert float((shared[:, :TARGET] - expected).abs().max()) > 1e-4  # far above the tolerance: modes differ


def test_zero_equals_shared_when_the_sample_is_at_timestep_zero():
    model = tiny_transformer().eval()
    inputs = dict(tiny_inputs(), timestep=torch.zeros(2))
    with torch.no_grad():
        torch.testing.assert_close(zero(model, inputs), blocks.block_forward(model, **inputs), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- what it changes


def test_zero_changes_target_outputs_only_when_references_exist():
    model = with_block_forward(tiny_transformer().eval())
    with torch.no_grad():
        with_refs = tiny_inputs()
        shared = model(**with_refs, return_dict=False, num_target_tokens=TARGET)[0]
        zeroed = model(**with_refs, return_dict=False, num_target_tokens=TARGET, reference_timestep="zero")[0]
        # Every target token moves, by ~1e-3 on this random model (0.2% of the output scale): far above rounding.
        per_token = (zeroed[:, :TARGET] - shared[:, :TARGET]).abs().amax(dim=-1)
        assert per_token.shape == (2, TARGET) and bool((per_token > 1e-5).all()) and float(per_token.max()) > 5e-4
        plain = tiny_inputs(reference=False)
        expected = model(**plain, return_dict=False)[0]
        for num_target in (None, TARGET):  # no reference tokens: bit-identical
            got = model(**plain, return_dict=False, num_target_tokens=num_target, reference_timestep="zero")[0]
            assert torch.equal(got, expected)
        # "shared" with the reference count given is diffusers' forward, bit for bit as before.
        assert torch.equal(shared, model(**with_refs, return_dict=False)[0])


def test_batch_equals_each_sample_alone():
    model = tiny_transformer().eval()
    inputs = tiny_inputs(batch=2)
    with torch.no_grad():
        batched = zero(model, inputs)
        for b in range(2):
            alone = zero(model, {k: v[b : b + 1] for k, v in inputs.items()})
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-5)


class _ModulationRecorder:
    """Forward pre-hooks that keep the modulation tensor each block gets (positional argument 2)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.handles = [b.register_forward_pre_hook(lambda mod, args: self.seen.append(args[2].detach().clone()))
                        for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("every, checkpointed", [(None, []), (1, [0, 1, 2, 3, 4]), (2, [0, 2, 4])])
def test_per_token_split_follows_the_kept_token_counts_under_tread(monkeypatch, every, checkpointed):
    """Inside route 1..3 the image stream holds 8 kept targets + 4 references: the last 4 rows of the
    modulation are timestep 0's, the others (text and kept targets) the sample's, in every block; whether the
    block is checkpointed or not. A checkpoint gets only the (B, C) modulations (what it keeps for backward)
    and builds the per-token tensor inside."""
    model = with_block_forward(tiny_transformer().train(), routes=(SPANNING,), checkpoint_every=every)
    inputs = tiny_inputs()
    into_checkpoint = []
    real_checkpoint = blocks.checkpoint

    def recording_checkpoint(function, *args, **kwargs):
        into_checkpoint.append((function.args[0], args[2].shape, args[3].shape))
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(blocks, "checkpoint", recording_checkpoint)
    recorder = _ModulationRecorder(model)
    model(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=TARGET,
          reference_timestep="zero")  # with gradients, so that checkpointing is on
    recorder.close()
    with torch.no_grad():
        mods = reference_modulations(model, inputs)
    all_blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    assert [all_blocks.index(b) for b, _, _ in into_checkpoint] == checkpointed
    for b, mod_shape, ref_shape in into_checkpoint:
        width = 6 * 256 if all_blocks.index(b) < 2 else 3 * 256
        assert mod_shape == ref_shape == (2, width)
    kept = tread.kept_count(TARGET, selection_ratio=0.5)
    lengths = [TARGET + REFS, kept + REFS, TEXT + kept + REFS, TEXT + kept + REFS, TEXT + TARGET + REFS]
    assert [m.shape[1] for m in recorder.seen] == lengths
    for i, (mod, length) in enumerate(zip(recorder.seen, lengths)):
        stream = "img" if i < 2 else "single"
        expected = torch.cat([mods[f"{stream}_t"].unsqueeze(1).expand(-1, length - REFS, -1),
                              mods[f"{stream}_0"].unsqueeze(1).expand(-1, REFS, -1)], dim=1)
        torch.testing.assert_close(mod, expected, rtol=0, atol=0, msg=f"block {i}")


def test_tread_at_ratio_zero_equals_no_tread():
    inputs = tiny_inputs()
    plain = with_block_forward(tiny_transformer().train())
    expected = plain(**inputs, return_dict=False, num_target_tokens=TARGET, reference_timestep="zero")[0]
    routed = with_block_forward(tiny_transformer().train(),
                                routes=(tread.Route(start=0, end=NUM_BLOCKS - 1, selection_ratio=0.0),))
    got = routed(**inputs, return_dict=False, tread_generators=generators(1, 2), num_target_tokens=TARGET,
                 reference_timestep="zero")[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    shared = plain(**inputs, return_dict=False, num_target_tokens=TARGET)[0]
    assert not torch.allclose(got, shared, atol=1e-3)


# -------------------------------------------------------------------------------------- gradients


def _loss_and_grads(model: torch.nn.Module, inputs: dict, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs, return_dict=False, num_target_tokens=TARGET, **kwargs)[0]
    loss = out[:, :TARGET].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_reach_every_lora_weight_and_checkpointing_changes_nothing():
    """TREAD + zero, without checkpointing, checkpointing every block and every 2nd block: same loss and LoRA
    gradients; all 60 LoRA tensors get a gradient, and it differs from the shared mode's."""
    inputs = tiny_inputs()
    results = {}
    for name, every, mode in (("zero", None, "zero"), ("ckpt1", 1, "zero"), ("ckpt2", 2, "zero"),
                              ("shared", None, "shared")):
        model = with_block_forward(tiny_transformer().train(), routes=(SPANNING,), checkpoint_every=every)
        results[name] = _loss_and_grads(model, inputs, tread_generators=generators(1, 2), reference_timestep=mode)
    (loss, grads), (_, grads_shared) = results["zero"], results["shared"]
    assert len(grads) == 60 and all("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert float(grad.abs().sum()) > 0, name
    for checkpointed in ("ckpt1", "ckpt2"):
        loss_ckpt, grads_ckpt = results[checkpointed]
        torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=1e-6, msg=f"{checkpointed} {name}")
    # Every LoRA gradient moves, by 0.5-5% of its largest entry here (the text stream's least): not rounding.
    differing = [n for n in grads
                 if float((grads[n] - grads_shared[n]).abs().max()) > 1e-3 * float(grads[n].abs().max())]
    assert len(differing) == 60


# ------------------------------------------------------------------------------------ the objective


def _edit_batch(spec: ObjectiveConfig, *, references: bool = True):
    g = torch.Generator().manual_seed(4)
    latents, embeds = torch.randn(2, 128, 4, 4, generator=g), torch.randn(2, TEXT, 96, generator=g)
    refs = [torch.randn(2, 128, 2, 2, generator=g)] if references else None
    return prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=spec,
                         generators=sample_generators(seed=0, step=0, first_index=0, count=2), reference_latents=refs)


def test_flow_matching_loss_uses_the_objectives_reference_timestep():
    model = with_block_forward(tiny_transformer().eval())
    prepared = _edit_batch(ObjectiveConfig(reference_timestep="zero"))
    assert prepared.reference_timestep == "zero" and prepared.num_target_tokens == TARGET
    inputs = dict(hidden_states=prepared.hidden_states, encoder_hidden_states=prepared.encoder_hidden_states,
                  timestep=prepared.timestep, img_ids=prepared.img_ids, txt_ids=prepared.txt_ids,
                  guidance=prepared.guidance)
    with torch.no_grad():
        loss = flow_matching_loss(model, prepared, device=torch.device("cpu"), dtype=torch.float32)
        expected = torch.nn.functional.mse_loss(zero(model, inputs)[:, :TARGET], prepared.target)
        shared = flow_matching_loss(model, _edit_batch(ObjectiveConfig()), device=torch.device("cpu"),
                                    dtype=torch.float32)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert abs(float(loss) - float(shared)) > 2e-6  # 1.2e-5 here; float32 rounding of a loss of 2.3 is ~2e-7


def test_zero_without_references_passes_diffusers_arguments_only():
    """A batch without references needs no trainer forward: a plain diffusers model still works."""
    model = tiny_transformer().eval()
    with torch.no_grad():
        loss = flow_matching_loss(model, _edit_batch(ObjectiveConfig(reference_timestep="zero"), references=False),
                                  device=torch.device("cpu"), dtype=torch.float32)
        shared = flow_matching_loss(model, _edit_batch(ObjectiveConfig(), references=False),
                                    device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(loss, shared)


def test_unused_reference_timestep_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="flux2_lora_pack.trainer.objective"):
        warn_unused_reference_timestep(ObjectiveConfig(reference_timestep="zero"), has_references=True)
        warn_unused_reference_timestep(ObjectiveConfig(), has_references=False)
        assert caplog.records == []
        warn_unused_reference_timestep(ObjectiveConfig(reference_timestep="zero"), has_references=False)
    assert [r.getMessage() for r in caplog.records] == [
        "config: reference_timestep='zero' has no effect because the dataset has no reference images."]


# ---------------------------------------------------------------------------------------- sampling


def _denoise(model, reference_timestep: str, *, references: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    embeds = torch.randn(1, TEXT, 96, generator=g)
    noise = torch.randn(1, 128, 4, 4, generator=g)
    refs = [torch.randn(1, 128, 2, 2, generator=g)] if references else None
    return sampling.denoise(model, prompt_embeds=embeds, latents=noise, num_steps=2, guidance=4.0,
                            reference_latents=refs, reference_timestep=reference_timestep)


def test_denoise_samples_references_in_the_chosen_mode():
    plain = tiny_transformer().eval()
    ours = with_block_forward(tiny_transformer().eval())
    shared = _denoise(plain, "shared")  # Flux2Pipeline / ComfyUI behaviour, the default
    torch.testing.assert_close(_denoise(ours, "shared"), shared, rtol=0, atol=1e-6)
    zeroed = _denoise(ours, "zero")
    assert float((zeroed - shared).abs().max()) > 1e-3
    # The zero-mode sample is Euler over block_forward(..., reference_timestep="zero"): check one step by hand.
    g = torch.Generator().manual_seed(9)
    embeds, noise, ref = (torch.randn(1, TEXT, 96, generator=g), torch.randn(1, 128, 4, 4, generator=g),
                          torch.randn(1, 128, 2, 2, generator=g))
    one_step = sampling.denoise(ours, prompt_embeds=embeds, latents=noise, num_steps=1, guidance=4.0,
                                reference_latents=[ref], reference_timestep="zero")
    inputs = dict(hidden_states=torch.cat([flux2.pack_latents(noise), flux2.pack_latents(ref)], 1),
                  encoder_hidden_states=embeds, timestep=torch.ones(1), guidance=torch.full((1,), 4.0),
                  img_ids=torch.cat([flux2.image_position_ids(1, 4, 4), flux2.reference_position_ids([(2, 2)], 1)], 1),
                  txt_ids=flux2.text_position_ids(1, TEXT))
    with torch.no_grad():
        pred = zero(ours, inputs)[:, :TARGET]
    torch.testing.assert_close(one_step, flux2.unpack_latents(flux2.pack_latents(noise) - pred, height=4, width=4),
                               rtol=0, atol=1e-6)
    # Without references the mode changes nothing.
    assert torch.equal(_denoise(ours, "zero", references=False), _denoise(plain, "shared", references=False))


def test_denoise_refuses_zero_on_a_plain_diffusers_model_and_bad_values():
    with pytest.raises(ValueError, match=r"reference_timestep 'zero' needs the trainer's forward"):
        _denoise(tiny_transformer().eval(), "zero")
    with pytest.raises(ValueError, match=r"reference_timestep 'half' must be one of \['shared', 'zero'\]"):
        _denoise(tiny_transformer().eval(), "half")


def test_validation_renders_with_the_training_mode(monkeypatch, tmp_path):
    from flux2_lora_pack.trainer import validation
    from flux2_lora_pack.trainer.model import Model
    from flux2_lora_pack.trainer.parallelize import DistEnv

    seen = []

    def fake_generate_images(transformer, vae, **kwargs):
        seen.append(kwargs["reference_timestep"])
        return torch.zeros(1, 16, 16, 3)

    monkeypatch.setattr(sampling, "generate_images", fake_generate_images)
    module = with_block_forward(tiny_transformer())
    model = Model(module=module, inner=module, compute_dtype=torch.float32, hidden_size=256)
    settings = SimpleNamespace(width=16, height=16, num_inference_steps=1, guidance=4.0, seed=0, num_images=1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for mode in ("zero", "shared"):
        validation.run_validation(model, None, prompts=[("p", "a prompt", torch.zeros(TEXT, 96))], settings=settings,
                            step=1, out_dir=tmp_path, env=env, reference_timestep=mode)
    assert seen == ["zero", "shared"]
    # What generate_images gets there (validation._Unwrapped) is recognised as running the trainer's forward.
    assert blocks.supports_reference_timestep(validation._Unwrapped(model))
    assert not blocks.supports_reference_timestep(tiny_transformer())


# ------------------------------------------------------------------------------------------ config


def _config(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "manifest.json").write_text("{}")
    return {"pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(tmp_path / "manifest.json"), **overrides}


def test_config_default_choice_and_bad_value(tmp_path):
    assert TrainConfig.from_dict(_config(tmp_path)).objective.reference_timestep == "shared"
    assert TrainConfig.from_dict(_config(tmp_path, reference_timestep="zero")).objective.reference_timestep == "zero"
    with pytest.raises(ValueError, match="reference_timestep") as info:
        TrainConfig.from_dict(_config(tmp_path, reference_timestep="0"))
    assert "'0'" in str(info.value) and "zero" in str(info.value)
    with pytest.raises(ValueError, match=r"reference_timestep 'none' must be one of"):
        ObjectiveConfig(reference_timestep="none")
