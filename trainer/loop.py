"""The training run: build, resume, step, checkpoint, validate, save. Runs under torchrun or alone.

`train(config)` reads top to bottom; the helpers below it hold the detail. Everything a step needs
comes from the dataset cache (latents, text embeddings), so no encoder is loaded here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__, checkpoint, parallelize
from .events import EventWriter
from .objective import GuidanceSpec, ObjectiveSpec, flow_matching_loss, prepare_batch, sample_generators

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


def build_model(*, folder, lora, precision: str, gradient_checkpointing: bool, distributed: str, seed: int,
                env: parallelize.DistEnv) -> Model:
    """Load the transformer, inject LoRA, wrap for the chosen distribution, in the order STYLE.md fixes."""
    from .lora import apply_lora
    from .model_files import load_transformer

    use_fsdp = distributed == "fsdp2" and env.world_size > 1
    bf16 = precision == "bf16"
    fp16 = precision == "fp16"
    # FSDP2 keeps fp32 master weights and casts to bf16 for compute; otherwise the frozen base is stored
    # in the compute dtype and only the LoRA weights are fp32.
    load_precision = "fp32" if use_fsdp or not (bf16 or fp16) else ("bf16" if bf16 else "fp16")
    transformer = load_transformer(folder, precision=load_precision, device="cpu" if use_fsdp else str(env.device))
    # LoRA A is drawn from the global generator: the same seed on every rank gives every rank (and a rerun)
    # the same initial adapter, which FSDP2 shards and a resumed run must match.
    torch.manual_seed(seed)
    apply_lora(transformer, preset=lora.target, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, init=lora.init)
    for name, param in transformer.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
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
            generators=generators,
        )
        with torch.autocast(env.device.type, dtype=model.compute_dtype, enabled=model.compute_dtype != torch.float32):
            loss = flow_matching_loss(model.module, prepared, device=env.device, dtype=model.compute_dtype)
        (loss / accum).backward()
        total += float(loss.detach())
    mean_loss = float(parallelize.all_reduce_mean(torch.tensor(total / accum), env))
    if not math.isfinite(mean_loss):
        if nan_policy == "skip_batch":
            optimizer.zero_grad(set_to_none=True)
            return mean_loss, False
        raise NonFiniteLossError(f"loss is {mean_loss} at step {step + 1}")
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.module.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return mean_loss, True


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
    spec = Flux2ModelSpec(
        folder=inspect_model_folder(config.model.root), precision="fp32" if env.device.type == "cpu" else "bf16"
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


def run_validation(model: Model, vae, *, prompts: list[tuple[str, str, torch.Tensor]], settings, step: int,
                   out_dir: Path, env: parallelize.DistEnv) -> list[dict[str, Any]]:
    """Render every validation prompt with the current LoRA; all ranks run the forward (FSDP2 needs it)."""
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
                    guidance=settings.guidance, seed=settings.seed,
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
    from .data import load_batch

    return [load_batch(manifest, next(batches).indices, dtype=dtype) for _ in range(count)]


def train(config, *, env: parallelize.DistEnv) -> Path | None:
    """The whole run. Returns the LoRA path on rank 0."""
    from .data import BucketBatchSampler, load_manifest, load_text_embedding
    from .model_files import inspect_model_folder, load_vae

    out_dir = config.checkpoint.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    events = EventWriter(out_dir, rank=env.rank)
    try:
        manifest = load_manifest(config.data.dataset_manifest)
        folder = inspect_model_folder(config.model.root, transformer_file=config.model.transformer_file,
                                      vae_file=config.model.vae_file)
        prompts = validation_prompts(config, env=env, cache_dir=out_dir / "text_cache")
        empty = load_text_embedding(manifest, "") if config.objective.caption_dropout_probability > 0 else None
        model = build_model(folder=folder, lora=config.lora, precision=config.memory.mixed_precision,
                            gradient_checkpointing=config.memory.gradient_checkpointing,
                            distributed=config.distributed, seed=config.seed, env=env)
        vae = load_vae(folder, precision="fp32", device=str(env.device)) if prompts else None
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
        )
        events.emit("start", world_size=env.world_size, device=str(env.device), start_step=start_step,
                    max_train_steps=total, num_images=len(manifest.items), resumed_from=str(resume) if resume else None,
                    lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, flux_lora_target=config.lora.target,
                    distributed=config.distributed, learning_rate=config.optim.learning_rate)
        batches = sampler.iter_batches()
        run_meta = {"dataset_fingerprint": manifest.fingerprint, "world_size": env.world_size}
        samples_per_step = config.data.train_batch_size * config.data.gradient_accumulation_steps * env.world_size
        started, done_steps = time.perf_counter(), 0
        for step in range(start_step, total):
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
            events.emit("step", step=step + 1, loss=loss, lr=lr, applied=applied, seconds_per_step=seconds,
                        samples_per_second=samples_per_step / max(seconds, 1e-9), max_train_steps=total,
                        eta_seconds=mean_seconds * (total - step - 1))
            number = step + 1
            if number % config.checkpoint.every_steps == 0:
                path = save_training_checkpoint(model, optimizer, lr_scheduler, output_dir=out_dir, step=number,
                                                sampler=sampler, total_limit=config.checkpoint.total_limit, env=env,
                                                run_meta=run_meta)
                events.emit("checkpoint", step=number, path=str(path.relative_to(out_dir)) if path else None)
            every = config.validation.every_steps
            if prompts and (number == total or (every > 0 and number % every == 0)):
                images = run_validation(model, vae, prompts=prompts, settings=config.validation, step=number,
                                        out_dir=out_dir, env=env)
                events.emit("validation", step=number, images=images)
        lora_path = save_final_lora(model, config=config, out_dir=out_dir, step=total, env=env,
                                    dataset_fingerprint=manifest.fingerprint)
        events.emit("end", step=total, lora_path=f"{config.output_name}.safetensors",
                    seconds=time.perf_counter() - started)
        return lora_path
    except BaseException as exc:
        events.emit("error", message=f"{type(exc).__name__}: {exc}", rank=env.rank)
        raise
    finally:
        events.close()
