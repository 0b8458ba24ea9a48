"""The training run: build, resume, step, checkpoint, validate, save. Runs under torchrun or alone.

`train(config)` reads top to bottom; the helpers below it hold the detail. Everything a step needs
comes from the dataset cache (latents, text embeddings), so no encoder is loaded here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__, checkpoint, failures, faults, parallelize, preflight, runlock
from .events import EventWriter, append_event
from .objective import (GuidanceSpec, ObjectiveSpec, flow_matching_loss, prepare_batch, sample_generators,
                        warn_unused_reference_timestep)

if TYPE_CHECKING:
    from .offload import EncoderSettings

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Model:
    """The wrapped transformer plus what the loop needs to drive it."""

    module: torch.nn.Module
    """What forward is called on (FSDP2/DDP wrapper or the plain transformer)."""
    inner: torch.nn.Module
    """The diffusers transformer (with PEFT LoRA layers) inside it."""
    compute_dtype: torch.dtype
    """dtype of the inputs fed to module."""
    hidden_size: int

    @property
    def tread(self) -> bool:
        """Whether the forward routes tokens (TREAD): train_step then hands it the per-sample generators."""
        settings = getattr(self.inner, "_block_forward_settings", None)
        return bool(settings is not None and settings.routes)


def build_model(*, folder, lora, precision: str, gradient_checkpointing: bool, distributed: str, seed: int,
                env: parallelize.DistEnv, gradient_checkpointing_interval: int | None = None,
                tread=None, quantization=None, offload=None) -> Model:
    """Load the transformer, inject LoRA, wrap for the chosen distribution, in the order STYLE.md fixes.

    quantization: config.QuantizationSettings (quanto, before LoRA); offload: config.OffloadSettings (group
    offload hooks on the frozen block weights, before DDP). Both default to off.
    """
    from .blocks import apply_block_forward
    from .lora import apply_lora
    from .model_files import load_transformer
    from .offload import apply_group_offload, check_offload
    from .quantize import apply_quantization, check_quantization
    from .tread import plan_routes

    use_fsdp = distributed == "fsdp2" and env.world_size > 1
    bf16 = precision == "bf16"
    fp16 = precision == "fp16"
    # FSDP2 keeps fp32 master weights and casts to bf16 for compute; otherwise the frozen base is stored
    # in the compute dtype and only the LoRA weights are fp32.
    load_precision = "fp32" if use_fsdp or not (bf16 or fp16) else ("bf16" if bf16 else "fp16")
    quantized = quantization is not None and quantization.base_quantized
    offloaded = offload is not None and offload.enabled
    if quantization is not None:  # refuse what cannot run before any weight loads
        check_quantization(base_model_precision=quantization.base_model_precision,
                           base_model_default_dtype=quantization.base_model_default_dtype,
                           quantize_via=quantization.quantize_via, mixed_precision=precision, distributed=distributed,
                           world_size=env.world_size, group_offload=offloaded)
    if offload is not None:
        check_offload(offload, device=env.device, distributed=distributed, world_size=env.world_size,
                      gradient_checkpointing=gradient_checkpointing, quantized=quantized)
    if quantized:  # the unquantized layers keep base_model_default_dtype
        load_precision = quantization.base_model_default_dtype
    # Quantization and offload start from CPU memory: the full-precision model never has to fit the device.
    load_device = "cpu" if use_fsdp or quantized or offloaded else str(env.device)
    transformer = load_transformer(folder, precision=load_precision, device=load_device)
    if quantized:
        apply_quantization(transformer, precision=quantization.base_model_precision,
                           default_dtype=quantization.base_model_default_dtype,
                           quantize_via=quantization.quantize_via, device=env.device)
    # LoRA A is drawn from the global generator: the same seed on every rank gives every rank (and a rerun)
    # the same initial adapter, which FSDP2 shards and a resumed run must match.
    torch.manual_seed(seed)
    apply_lora(transformer, preset=lora.target, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init)
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    # Our block loop (trainer/blocks.py) is the forward from here on: checkpointing and TREAD live in it.
    routes = plan_routes(tread, num_blocks=len(parallelize.transformer_blocks(transformer))) if tread else ()
    apply_block_forward(transformer, routes=routes,
                        checkpoint_every=(gradient_checkpointing_interval or 1) if gradient_checkpointing else None)
    if offloaded:
        apply_group_offload(transformer, settings=offload, device=env.device)
    transformer.train()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if use_fsdp:
        module = parallelize.apply_fsdp(transformer, env=env, bf16=bf16)
        if env.device.type != "cpu":
            module.to(env.device)
        return Model(module=module, inner=transformer, compute_dtype=torch.float32, hidden_size=hidden)
    compute = torch.bfloat16 if bf16 else (torch.float16 if fp16 else torch.float32)
    if distributed in ("ddp", "fsdp2") and env.world_size > 1:
        return Model(module=parallelize.apply_ddp(transformer, env=env), inner=transformer, compute_dtype=compute,
                     hidden_size=hidden)
    return Model(module=transformer, inner=transformer, compute_dtype=compute, hidden_size=hidden)


def build_optimizer(model: Model, *, optim) -> torch.optim.Optimizer:
    params = [p for p in model.module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: LoRA injection found no target modules")
    return torch.optim.AdamW(
        params,
        lr=optim.learning_rate,
        betas=(optim.adam_beta1, optim.adam_beta2),
        weight_decay=optim.adam_weight_decay,
        eps=optim.adam_epsilon,
    )


def lr_lambda(*, scheduler: str, warmup_steps: int, total_steps: int):
    """Multiplier on the base learning rate at a step (0-based), for torch's LambdaLR."""

    def factor(step: int) -> float:
        if scheduler == "constant":
            return 1.0
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if scheduler == "linear":
            return max(0.0, 1.0 - progress)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"lr_scheduler {scheduler!r} is not one of constant, constant_with_warmup, linear, cosine.")

    return factor


def train_step(model: Model, optimizer: torch.optim.Optimizer, *, micro_batches: list[Any], objective: ObjectiveSpec,
               empty_embeds: torch.Tensor | None, seed: int, step: int, env: parallelize.DistEnv,
               max_grad_norm: float, nan_policy: str) -> tuple[float, bool]:
    """One optimizer step over gradient-accumulation micro-batches. Returns (mean loss, applied)."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    accum = len(micro_batches)
    for micro, batch in enumerate(micro_batches):
        size = batch.latents.shape[0]
        # This rank's samples sit at [rank * size, (rank + 1) * size) of the micro-step's global batch.
        first = (micro * env.world_size + env.rank) * size
        generators = sample_generators(seed=seed, step=step, first_index=first, count=size)
        torch.manual_seed(generators[0].initial_seed())  # LoRA dropout draws from the global generator
        prepared = prepare_batch(
            latents=batch.latents, prompt_embeds=batch.prompt_embeds, empty_embeds=empty_embeds, spec=objective,
            generators=generators, reference_latents=batch.reference_latents or None,
        )
        with torch.autocast(env.device.type, dtype=model.compute_dtype, enabled=model.compute_dtype != torch.float32):
            loss = flow_matching_loss(model.module, prepared, device=env.device, dtype=model.compute_dtype,
                                      tread_generators=generators if model.tread else None)
        loss = faults.corrupt_loss(loss, step=step + 1)  # test-only hook, inert unless FLUX2LORA_FAULT is set
        (loss / accum).backward()
        total += float(loss.detach())
    faults.fault_point("step", number=step + 1)  # test-only: a crashing, hung or killed rank mid-step
    mean_loss = float(parallelize.all_reduce_mean(torch.tensor(total / accum), env))
    files = ", ".join(str(p) for batch in micro_batches for p in batch.image_paths)
    problem = None
    if not math.isfinite(mean_loss):
        problem = f"loss is {mean_loss}"
        advice = "Check those images, lower learning_rate, or set nan_policy 'skip_batch' to skip such batches."
    else:
        # A finite loss can still give inf/NaN gradients (an overflow in backward); one such step ruins the
        # LoRA. Every rank sees the same norm (DDP and FSDP2 reduce it), so every rank takes the same branch.
        grad_norm = _gradient_norm(model, max_norm=max_grad_norm)
        if not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} with a finite loss {mean_loss:.5f}"
            advice = "Lower learning_rate, use mixed_precision bf16 rather than fp16, or set nan_policy 'skip_batch'."
    if problem is not None:
        if nan_policy == "skip_batch":
            optimizer.zero_grad(set_to_none=True)
            return mean_loss, False
        raise NonFiniteLossError(
            f"{problem} at step {step + 1} (rank {env.rank}'s batch: {files}); nan_policy 'stop' ended the run before "
            f"the optimizer step, so the LoRA holds no NaN. {advice}")
    optimizer.step()
    return mean_loss, True


def _gradient_norm(model: Model, *, max_norm: float) -> float:
    """The global L2 norm of the LoRA gradients, clipped to max_norm first when max_norm > 0."""
    params = [p for p in model.module.parameters() if p.requires_grad and p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm before clipping
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the reduced norm
        norm = norm.full_tensor()
    return float(norm)


def save_training_checkpoint(model: Model, optimizer, lr_scheduler, *, output_dir: Path, step: int, sampler,
                             total_limit: int | None, env: parallelize.DistEnv, run_meta: dict[str, Any]) -> Path | None:
    """Gather (collective) and write checkpoint-<step> on rank 0."""
    lora_state = parallelize.full_lora_state(model.module, env=env)
    optim_state = parallelize.full_optimizer_state(model.module, optimizer, env=env)
    path = None
    if env.is_main:
        optim_tensors, optim_meta = checkpoint.flatten_optimizer_state(optim_state)
        tensors = {f"lora/{k}": v for k, v in lora_state.items()} | optim_tensors
        meta = {
            "optimizer": optim_meta,
            "lr_scheduler": lr_scheduler.state_dict(),
            "data": sampler.state_dict(),
            "run": run_meta,
            "trainer_version": __version__,
        }
        path = checkpoint.save_checkpoint(output_dir, step=step, tensors=tensors, meta=meta, total_limit=total_limit)
    parallelize.barrier(env)
    return path


def restore_checkpoint(model: Model, optimizer, lr_scheduler, *, path: Path, sampler, env: parallelize.DistEnv) -> int:
    tensors, meta = checkpoint.load_checkpoint(path)
    lora_state = {k[len("lora/"):]: v for k, v in tensors.items() if k.startswith("lora/")}
    optim_state = checkpoint.unflatten_optimizer_state(
        {k: v for k, v in tensors.items() if k.startswith("optim/")}, meta["optimizer"]
    )
    parallelize.load_full_state(model.module, optimizer, lora_state=lora_state, optimizer_state=optim_state, env=env)
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    sampler.load_state_dict(meta["data"])
    return int(meta["step"])



def validation_prompts(config, *, env: parallelize.DistEnv, cache_dir: Path) -> list[tuple[str, str, torch.Tensor]]:
    """(name, prompt, embeddings) of every validation prompt; rank 0 encodes, then releases the encoder."""
    from .inference import Flux2ModelSpec, encode_prompts_cached
    from .model_files import inspect_model_folder

    prompts = config.validation_prompts() if config.validation.enabled else {}
    if not prompts:
        return []
    from .offload import EncoderSettings

    spec = Flux2ModelSpec(
        folder=inspect_model_folder(config.model.root), precision="fp32" if env.device.type == "cpu" else "bf16",
        encoders=EncoderSettings.from_config(config),  # text_encoder_1_precision, group_offload_text_encoder
    )
    names, texts = list(prompts), list(prompts.values())
    if env.is_main:
        encode_prompts_cached(spec, texts, cache_dir=cache_dir, device=str(env.device))
    parallelize.barrier(env)
    from .inference import release_all

    embeds, _ = encode_prompts_cached(spec, texts, cache_dir=cache_dir, device=str(env.device))
    release_all()
    return [(n, t, e) for n, t, e in zip(names, texts, embeds)]


class _Unwrapped(torch.nn.Module):
    """Lets the sampler call a DDP-wrapped model by its diffusers signature and read its dtype."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.wrapped = model.module
        self.inner = model.inner

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def forward(self, **kwargs):
        return self.wrapped(**kwargs)


def validation_reference_latents(paths: tuple[Path, ...], *, vae, device: torch.device,
                                 encoders: EncoderSettings | None = None) -> list[torch.Tensor] | None:
    """validation_reference_images encoded once by the validation VAE: (1, 128, h, w) each, or None for none.

    Prepared as Flux2Pipeline prepares `image=` (flux2.prepare_reference_pixels). Every rank encodes its own copy
    (posterior mode: no randomness), so no tensor crosses processes.
    """
    if not paths:
        return None
    from PIL import Image

    from . import flux2
    from .offload import onloaded

    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    pixels = flux2.prepare_reference_pixels(images, input_name="validation_reference_images")
    log.info("validation renders with %d reference image(s) of %s px (WxH, after FLUX.2's resize and crop)",
             len(pixels), ", ".join(f"{p.shape[-1]}x{p.shape[-2]}" for p in pixels))
    with torch.no_grad(), onloaded(vae, device=device, encoders=encoders):  # offload_during_startup
        return [flux2.encode_images(vae, p) for p in pixels]


def run_validation(model: Model, vae, *, prompts: list[tuple[str, str, torch.Tensor]], settings, step: int,
                   out_dir: Path, env: parallelize.DistEnv, reference_timestep: str = "shared",
                   reference_latents: list[torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Render every validation prompt with the current LoRA; all ranks run the forward (FSDP2 needs it).

    reference_timestep: the training objective's, so images rendered with reference latents see them as training did.
    reference_latents: validation_reference_latents' result, given to every prompt; None renders without references.
    """
    from PIL import Image

    from .sampling import generate_images

    was_training = model.inner.training
    model.inner.eval()
    records = []
    try:
        with torch.no_grad():
            for name, prompt, embeds in prompts:
                images = generate_images(
                    _Unwrapped(model), vae, prompt_embeds=embeds.unsqueeze(0).to(env.device, model.compute_dtype),
                    width=settings.width, height=settings.height, num_steps=settings.num_inference_steps,
                    guidance=settings.guidance, seed=settings.seed, reference_timestep=reference_timestep,
                    reference_latents=reference_latents,
                )
                if env.is_main:
                    rel = Path("validation") / f"step{step:06d}_{_slug(name)}.png"
                    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    array = (images[0].numpy() * 255.0).round().clip(0, 255).astype("uint8")
                    Image.fromarray(array).save(out_dir / rel)
                    records.append({"name": name, "prompt": prompt, "path": rel.as_posix()})
    finally:
        model.inner.train(was_training)
    return records


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)[:40] or "prompt"


def save_final_lora(model: Model, *, config, out_dir: Path, step: int, env: parallelize.DistEnv,
                    dataset_fingerprint: str) -> Path | None:
    """Gather the LoRA (collective) and write it in ComfyUI/BFL layout with its metadata, on rank 0."""
    from .lora_keys import diffusers_to_comfy, lora_metadata, save_lora_file

    state = parallelize.full_lora_state(model.module, env=env)
    if not env.is_main:
        return None
    lora = config.lora
    comfy = diffusers_to_comfy(state, alpha=lora.alpha, rank=lora.rank, hidden_size=model.hidden_size)
    metadata = lora_metadata(
        rank=lora.rank, alpha=lora.alpha, targets=lora.target, base_model="FLUX.2-" + config.model_flavour,
        steps=step, dataset_fingerprint=dataset_fingerprint,
    )
    path = out_dir / f"{config.output_name}.safetensors"
    save_lora_file(path, state=comfy, metadata=metadata, layout="comfyui")
    return path


def _micro_batches(batches, count: int, *, manifest, dtype) -> list[Any]:
    from .manifest import load_batch

    refs = [next(batches) for _ in range(count)]
    return [load_batch(manifest, r.indices, references=r.references or None, captions=r.captions or None,
                       dtype=dtype) for r in refs]


def train(config, *, env: parallelize.DistEnv) -> Path | None:
    """The whole run. Returns the LoRA path on rank 0."""
    from .data import resolve_training_manifest
    from .manifest import load_text_embedding
    from .sampler import BucketBatchSampler
    from .model_files import inspect_model_folder
    from .offload import EncoderSettings, load_validation_vae, onloaded

    encoders = EncoderSettings.from_config(config)
    out_dir = config.checkpoint.output_dir
    preflight.check_output_writable(out_dir)  # creates it; a clear error when it cannot be written
    # One run per output folder: rank 0 holds the lock (or shares the launching node's) before writing anything.
    lock = runlock.acquire_run_lock(out_dir, owner="trainer", token=os.environ.get(runlock.TOKEN_ENV)) \
        if env.is_main else None
    events = EventWriter(out_dir, rank=env.rank)
    where: dict[str, Any] = {"step": None, "phase": "start-up"}  # for the error event
    try:
        folder = inspect_model_folder(config.model.root, transformer_file=config.model.transformer_file,
                                      vae_file=config.model.vae_file)
        if env.is_main:  # free space and LoRA rank vs model, before any weights load
            preflight.check_run(config, folder=folder, out_dir=out_dir,
                                existing_checkpoints=len(checkpoint.list_checkpoints(out_dir)))
        # A data_backend_config is built here by rank 0 (cache misses only), before the transformer loads.
        manifest = resolve_training_manifest(
            dataset_manifests=config.data.dataset_manifests, data_backend_config=config.data.data_backend_config,
            model=folder, out_dir=out_dir, is_main=env.is_main, barrier=lambda: parallelize.barrier(env),
            device=str(env.device), vae_batch_size=config.data.vae_batch_size, encoders=encoders)
        prompts = validation_prompts(config, env=env, cache_dir=out_dir / "text_cache")
        empty = load_text_embedding(manifest, "") if config.objective.caption_dropout_probability > 0 else None
        where["phase"] = "model load"
        faults.fault_point("load")  # test-only
        model = build_model(folder=folder, lora=config.lora, precision=config.memory.mixed_precision,
                            gradient_checkpointing=config.memory.gradient_checkpointing,
                            gradient_checkpointing_interval=config.memory.gradient_checkpointing_interval,
                            tread=config.tread, distributed=config.distributed, seed=config.seed, env=env,
                            quantization=config.quantization, offload=config.offload)
        vae = load_validation_vae(folder, precision="fp32", device=str(env.device), encoders=encoders) if prompts else None
        references = validation_reference_latents(config.validation.reference_images, vae=vae, device=env.device,
                                                  encoders=encoders) if prompts else None
        optimizer = build_optimizer(model, optim=config.optim)
        schedule = config.schedule
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            scheduler=schedule.scheduler, warmup_steps=schedule.warmup_steps, total_steps=schedule.total_steps))
        sampler = BucketBatchSampler(manifest, batch_size=config.data.train_batch_size, seed=config.seed,
                                     rank=env.rank, world_size=env.world_size)
        start_step = 0
        resume = checkpoint.resolve_resume(out_dir, config.checkpoint.resume_from)
        if resume is not None:
            start_step = restore_checkpoint(model, optimizer, lr_scheduler, path=resume, sampler=sampler, env=env)
            log.info("resumed from %s at step %d", resume, start_step)
        total = config.max_train_steps
        objective = ObjectiveSpec(
            shift=config.objective.shift, auto_shift=config.objective.auto_shift,
            caption_dropout_probability=config.objective.caption_dropout_probability,
            guidance=GuidanceSpec(mode=config.guidance.mode, value=config.guidance.value,
                                  minimum=config.guidance.minimum, maximum=config.guidance.maximum),
            reference_timestep=config.objective.reference_timestep,
        )
        if env.is_main:
            has_references = any(it.references for it in manifest.items)
            warn_unused_reference_timestep(objective, has_references=has_references)
            if references and not has_references:
                log.warning("config: validation_reference_images is set but the dataset has no reference images: "
                            "validation renders with references a LoRA never trained on.")
        events.emit("start", world_size=env.world_size, device=str(env.device), start_step=start_step,
                    max_train_steps=total, num_images=len(manifest.items), resumed_from=str(resume) if resume else None,
                    lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, flux_lora_target=config.lora.target,
                    distributed=config.distributed, learning_rate=config.optim.learning_rate)
        batches = sampler.iter_batches()
        run_meta = {"dataset_fingerprint": manifest.fingerprint, "world_size": env.world_size}
        samples_per_step = config.data.train_batch_size * config.data.gradient_accumulation_steps * env.world_size
        started, done_steps = time.perf_counter(), 0
        for step in range(start_step, total):
            where.update(step=step + 1, phase="train")
            step_started = time.perf_counter()
            micro = _micro_batches(batches, config.data.gradient_accumulation_steps, manifest=manifest,
                                   dtype=torch.float32)
            loss, applied = train_step(model, optimizer, micro_batches=micro, objective=objective, empty_embeds=empty,
                                       seed=config.seed, step=step, env=env, max_grad_norm=config.optim.max_grad_norm,
                                       nan_policy=config.nan_policy)
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            done_steps += 1
            seconds = time.perf_counter() - step_started
            mean_seconds = (time.perf_counter() - started) / done_steps
            peak = failures.peak_memory_bytes()
            events.emit("step", step=step + 1, loss=loss, lr=lr, applied=applied, seconds_per_step=seconds,
                        samples_per_second=samples_per_step / max(seconds, 1e-9), max_train_steps=total,
                        eta_seconds=mean_seconds * (total - step - 1),
                        peak_memory_mb=None if peak is None else round(peak / 2**20, 1),
                        datasets=sorted({manifest.items[b.indices[0]].source for b in micro}))
            number = step + 1
            if number % config.checkpoint.every_steps == 0:
                where["phase"] = "checkpoint"
                path = save_training_checkpoint(model, optimizer, lr_scheduler, output_dir=out_dir, step=number,
                                                sampler=sampler, total_limit=config.checkpoint.total_limit, env=env,
                                                run_meta=run_meta)
                events.emit("checkpoint", step=number, path=str(path.relative_to(out_dir)) if path else None)
            every = config.validation.every_steps
            if prompts and (number == total or (every > 0 and number % every == 0)):
                where["phase"] = "validation"
                faults.fault_point("validation", number=number)  # test-only
                with onloaded(vae, device=env.device, encoders=encoders):  # offload_during_startup
                    images = run_validation(model, vae, prompts=prompts, settings=config.validation, step=number,
                                            out_dir=out_dir, env=env, reference_timestep=objective.reference_timestep,
                                            reference_latents=references)
                events.emit("validation", step=number, images=images)
        where["phase"] = "saving the LoRA"
        lora_path = save_final_lora(model, config=config, out_dir=out_dir, step=total, env=env,
                                    dataset_fingerprint=manifest.fingerprint)
        events.emit("end", step=total, lora_path=f"{config.output_name}.safetensors",
                    seconds=time.perf_counter() - started)
        return lora_path
    except BaseException as exc:
        try:
            report = failures.failure_report(exc, step=where["step"], phase=where["phase"], rank=env.rank,
                                             config=config, out_dir=out_dir)
        except Exception:  # noqa: BLE001 - explaining the failure must never hide it
            report = {"message": f"{type(exc).__name__}: {exc}", "rank": env.rank, "step": where["step"]}
        if env.is_main:
            events.emit("error", **report)
        else:  # every rank names its own failure: the first error in the file is the root cause
            append_event(out_dir, "error", **report)
        raise
    finally:
        events.close()
        if lock is not None:
            lock.release()
