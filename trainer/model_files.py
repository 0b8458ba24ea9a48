"""Finding, checking and loading the parts of a FLUX.2 model on disk.

A FLUX.2 model is a diffusers-layout folder (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), as black-forest-labs/FLUX.2-dev ships it. A single-file transformer
(ComfyUI's models/diffusion_models) or VAE (models/vae) can replace the folder's part where
diffusers can read it. Every check here reads only small JSON files, so a wrong folder is refused
before gigabytes of weights load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")

# What FLUX.2's pipeline parts must be; anything else is another model family.
_EXPECTED_CLASSES = {
    "transformer": "Flux2Transformer2DModel",
    "vae": "AutoencoderKLFlux2",
    "text_encoder": "Mistral3ForConditionalGeneration",
}
_KNOWN_OTHER_PIPELINES = {
    "FluxPipeline": "FLUX.1",
    "FluxKontextPipeline": "FLUX.1 Kontext",
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusion3Pipeline": "SD3",
    "Flux2KleinPipeline": "FLUX.2 klein (Qwen3 text encoder)",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelFolder:
    """Resolved paths of one FLUX.2 model; what the FLUX2_MODEL handle carries across processes."""

    root: Path
    """The diffusers-layout folder."""
    transformer_file: Path | None = None
    """Optional single-file transformer that replaces root/transformer."""
    vae_file: Path | None = None
    """Optional single-file VAE that replaces root/vae."""

    @property
    def transformer_dir(self) -> Path:
        return self.root / "transformer"

    @property
    def vae_dir(self) -> Path:
        return self.root / "vae"

    @property
    def text_encoder_dir(self) -> Path:
        return self.root / "text_encoder"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def scheduler_dir(self) -> Path:
        return self.root / "scheduler"

    def transformer_config(self) -> dict[str, Any]:
        return _read_json(self.transformer_dir / "config.json", what="transformer config")

    def text_encoder_config(self) -> dict[str, Any]:
        return _read_json(self.text_encoder_dir / "config.json", what="text encoder config")

    def vae_config(self) -> dict[str, Any]:
        return _read_json(self.vae_dir / "config.json", what="VAE config")

    def identity(self) -> dict[str, Any]:
        """What makes two loads the same model: used in cache keys (contents of configs, not paths)."""
        ident: dict[str, Any] = {
            "transformer": self.transformer_config(),
            "vae": self.vae_config(),
            "text_encoder": self.text_encoder_config(),
        }
        for name, f in (("transformer_file", self.transformer_file), ("vae_file", self.vae_file)):
            if f is not None:
                st = f.stat()
                ident[name] = {"name": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        for part in ("transformer", "vae", "text_encoder"):
            ident[f"{part}_weights"] = _weights_signature(self.root / part)
        return ident


def _weights_signature(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors") if p.is_file()
    )


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{what} not found: {path} is missing; is this a complete FLUX.2 diffusers folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc}); re-download or re-copy that file.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object.")
    return data


def inspect_model_folder(
    root: str | Path, *, transformer_file: str | Path | None = None, vae_file: str | Path | None = None
) -> ModelFolder:
    """Check that root is a FLUX.2 diffusers folder and return its resolved parts.

    Reads only JSON; raises ValueError that names the folder, what is wrong and what to do.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(
            f"model folder {root} does not exist. Give the local diffusers folder of FLUX.2-dev "
            "(with model_index.json); weights are never downloaded."
        )
    if not root.is_dir():
        raise ValueError(f"model folder {root} is a file, not a folder; give the diffusers folder that holds model_index.json.")
    root = root.resolve()
    index = _read_json(root / "model_index.json", what="model_index.json")
    cls = index.get("_class_name", "")
    if cls != "Flux2Pipeline":
        family = _KNOWN_OTHER_PIPELINES.get(cls, f"'{cls}'")
        raise ValueError(
            f"model folder {root} holds a {family} model (model_index.json _class_name={cls!r}), not FLUX.2-dev "
            "(Flux2Pipeline). Point Load FLUX.2 at a FLUX.2-dev diffusers folder."
        )
    for part, expected in _EXPECTED_CLASSES.items():
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == expected):
            raise ValueError(
                f"model folder {root}: model_index.json lists {part}={entry!r}, expected {expected}; "
                "this is not a FLUX.2-dev folder."
            )
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise ValueError(f"model folder {root} has no {part}/ subfolder; the download looks incomplete.")
    folder = ModelFolder(
        root=root,
        transformer_file=_check_single_file(transformer_file, what="transformer file"),
        vae_file=_check_single_file(vae_file, what="VAE file"),
    )
    tcfg = folder.transformer_config()
    if tcfg.get("in_channels") != 128:
        raise ValueError(
            f"transformer config {folder.transformer_dir / 'config.json'}: in_channels={tcfg.get('in_channels')}, "
            "FLUX.2 has 128 (32 latent channels, 2x2 patchified). This is not a FLUX.2 transformer."
        )
    vcfg = folder.vae_config()
    if vcfg.get("latent_channels") != 32:
        raise ValueError(
            f"VAE config {folder.vae_dir / 'config.json'}: latent_channels={vcfg.get('latent_channels')}, "
            "FLUX.2's VAE has 32. This is not a FLUX.2 VAE."
        )
    text_cfg = folder.text_encoder_config().get("text_config", {})
    expected_features = 3 * int(text_cfg.get("hidden_size", -1))
    if tcfg.get("joint_attention_dim") != expected_features:
        raise ValueError(
            f"model folder {root}: transformer joint_attention_dim={tcfg.get('joint_attention_dim')} does not match "
            f"3 x text encoder hidden size ({expected_features}); the text encoder and transformer do not belong together."
        )
    if int(text_cfg.get("num_hidden_layers", 0)) < 30:
        raise ValueError(
            f"text encoder {folder.text_encoder_dir}: {text_cfg.get('num_hidden_layers')} layers; FLUX.2 reads hidden "
            "states 10, 20 and 30, so it needs at least 30."
        )
    return folder


def _check_single_file(path: str | Path | None, *, what: str) -> Path | None:
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{what} {p} does not exist.")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{what} {p} is a {p.suffix or 'suffix-less'} file; only .safetensors is loaded (pickle files are never "
            "opened). Convert it to safetensors or use the diffusers folder's own weights."
        )
    return p.resolve()


def torch_dtype(precision: str):
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if precision not in table:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    return table[precision]


def load_tokenizer(folder: ModelFolder):
    """The tokenizer inside the PixtralProcessor folder; loading it needs no torchvision."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder.tokenizer_dir)


def load_text_encoder(folder: ModelFolder, *, precision: str = "bf16", device: str = "cpu"):
    from transformers import Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(
        folder.text_encoder_dir, dtype=torch_dtype(precision), use_safetensors=True
    )
    return model.to(device).eval().requires_grad_(False)


def load_vae(folder: ModelFolder, *, precision: str = "fp32", device: str = "cpu"):
    from diffusers import AutoencoderKLFlux2

    dtype = torch_dtype(precision)
    if folder.vae_file is not None:
        vae = AutoencoderKLFlux2.from_single_file(folder.vae_file, config=str(folder.vae_dir), torch_dtype=dtype)
    else:
        vae = AutoencoderKLFlux2.from_pretrained(folder.vae_dir, torch_dtype=dtype, use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def load_transformer(folder: ModelFolder, *, precision: str = "bf16", device: str = "cpu"):
    from diffusers import Flux2Transformer2DModel

    dtype = torch_dtype(precision)
    if folder.transformer_file is not None:
        model = Flux2Transformer2DModel.from_single_file(
            folder.transformer_file, config=str(folder.transformer_dir), torch_dtype=dtype
        )
    else:
        model = Flux2Transformer2DModel.from_pretrained(folder.transformer_dir, torch_dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def scheduler_config(folder: ModelFolder) -> dict[str, Any]:
    return _read_json(folder.scheduler_dir / "scheduler_config.json", what="scheduler config")


# ------------------------------------------------------------------------------ loading without a full copy


def empty_transformer(folder: ModelFolder):
    """The transformer with uninitialised fp32 CPU weights: the operating system backs them with memory only
    where they are written, so a rank that then shards it (FSDP2) never holds the full model.

    Fill the frozen weights with fill_from_safetensors once they are sharded (or replaced by tensors of their
    final dtype); LoRA layers added in between are ordinary, initialised tensors.
    """
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    config = {k: v for k, v in folder.transformer_config().items() if not k.startswith("_")}
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    return model.to_empty(device="cpu").float().eval().requires_grad_(False)


def transformer_weight_files(folder: ModelFolder) -> dict[str, Path]:
    """Tensor name -> the safetensors file of the folder's transformer/ that holds it (one file or an index)."""
    index = folder.transformer_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, what="transformer weight index")["weight_map"]
        return {name: folder.transformer_dir / file for name, file in weight_map.items()}
    single = folder.transformer_dir / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


def fill_from_safetensors(model: Any, folder: ModelFolder) -> int:
    """Read every frozen weight of `model` (plain, or an FSDP2 DTensor shard on dim 0) from the folder's
    safetensors files: a shard reads only its own rows. PEFT's `.base_layer` is not part of the file's names.
    Returns the bytes read. Raises ValueError naming a weight the files do not hold or hold in another shape."""
    import torch
    from safetensors import safe_open

    files = transformer_weight_files(folder)
    wanted = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    by_file: dict[Path, list[tuple[str, str, Any]]] = {}
    for name, param in wanted:
        key = name.replace(".base_layer.", ".")
        if key not in files:
            raise ValueError(f"{folder.transformer_dir}: the transformer weights have no tensor {key!r}; the folder "
                             "does not match its config.json (re-download or re-convert it).")
        by_file.setdefault(files[key], []).append((name, key, param))
    read = 0
    with torch.no_grad():
        for path, entries in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for name, key, param in entries:
                    local, start = _local_rows(param)
                    source = handle.get_slice(key)
                    if tuple(source.get_shape()) != tuple(param.shape):
                        raise ValueError(f"{path}: {key} has shape {tuple(source.get_shape())}, the model expects "
                                         f"{tuple(param.shape)}; the weights do not match config.json.")
                    if local.numel():
                        rows = source[start:start + local.shape[0]]
                        local.copy_(rows.to(local.dtype))
                        read += rows.numel() * rows.element_size()
    return read


def _local_rows(param: Any) -> tuple[Any, int]:
    """(this process's part of param, its first row): an FSDP2 Shard(0) DTensor holds torch.chunk's rows."""
    import math

    if not hasattr(param, "to_local"):
        return param.data, 0
    rank = param.device_mesh.get_local_rank()
    chunk = math.ceil(param.shape[0] / param.device_mesh.size())
    return param.to_local(), min(rank * chunk, param.shape[0])
