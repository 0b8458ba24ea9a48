"""Finding, checking and loading the parts of a FLUX.2 model on disk.

A FLUX.2 model is a diffusers-layout folder (model_index.json, transformer/, vae/, text_encoder/,
tokenizer/, scheduler/), as black-forest-labs/FLUX.2-dev and FLUX.2-klein-(base-)4B/9B ship it; which flavour
it holds (trainer/flavours.py) is read from its JSON. A single-file transformer
(ComfyUI's models/diffusion_models) or VAE (models/vae) can replace the folder's part where
diffusers can read it. Every check here reads only small JSON files, so a wrong folder is refused
before gigabytes of weights load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .safetensors_reader import SafetensorsFile

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")

# What FLUX.2's pipeline parts must be (the text encoder's class depends on the flavour); anything else is
# another model family.
_EXPECTED_CLASSES = {
    "transformer": "Flux2Transformer2DModel",
    "vae": "AutoencoderKLFlux2",
}
_KNOWN_OTHER_PIPELINES = {
    "FluxPipeline": "FLUX.1",
    "FluxKontextPipeline": "FLUX.1 Kontext",
    "StableDiffusionXLPipeline": "SDXL",
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusion3Pipeline": "SD3",
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
    flavour: str = "dev"
    """Which FLUX.2 it is (trainer/flavours.py): "dev", "klein-4b" or "klein-9b", as inspect_model_folder read it."""
    is_distilled: bool = False
    """klein only: the step-distilled model (model_index.json is_distilled; 4 steps, no CFG) rather than base."""

    @property
    def spec(self):
        """The flavour's FlavourSpec (real sizes, text conventions)."""
        from .flavours import spec

        return spec(self.flavour)

    def describe(self) -> str:
        """What the folder holds, for users: e.g. "FLUX.2 [klein] 9B (base; Qwen3-8B text encoder, ...)"."""
        return self.spec.describe(is_distilled=self.is_distilled)

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
    root: str | Path, *, transformer_file: str | Path | None = None, vae_file: str | Path | None = None,
    flavour: str | None = None,
) -> ModelFolder:
    """Check that root is a FLUX.2 diffusers folder (dev, or klein base / distilled) and return its resolved parts,
    with the flavour and is_distilled read from its JSON.

    flavour: the model_flavour a config asks for; a folder that holds another flavour is refused, naming both.
    Reads only JSON; raises ValueError that names the folder, what is wrong and what to do.
    """
    from .flavours import SPECS, check_flavour_matches, flavour_of_folder, text_hidden_size, text_num_layers

    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(
            f"model folder {root} does not exist. Give the local diffusers folder of FLUX.2-dev or FLUX.2-klein "
            "(with model_index.json); weights are never downloaded."
        )
    if not root.is_dir():
        raise ValueError(f"model folder {root} is a file, not a folder; give the diffusers folder that holds model_index.json.")
    root = root.resolve()
    index = _read_json(root / "model_index.json", what="model_index.json")
    cls = index.get("_class_name", "")
    if cls not in ("Flux2Pipeline", "Flux2KleinPipeline"):
        family = _KNOWN_OTHER_PIPELINES.get(cls, f"'{cls}'")
        raise ValueError(
            f"model folder {root} holds a {family} model (model_index.json _class_name={cls!r}), not FLUX.2 "
            "(Flux2Pipeline for dev, Flux2KleinPipeline for klein). Point Load FLUX.2 at a FLUX.2 diffusers folder."
        )
    is_klein = cls == "Flux2KleinPipeline"
    expected_classes = dict(_EXPECTED_CLASSES, text_encoder=SPECS["klein-4b" if is_klein else "dev"].text_encoder_class)
    for part, expected in expected_classes.items():
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == expected):
            raise ValueError(
                f"model folder {root}: model_index.json lists {part}={entry!r}, expected {expected}; "
                f"this is not a FLUX.2 {'klein' if is_klein else 'dev'} folder."
            )
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (root / part).is_dir():
            raise ValueError(f"model folder {root} has no {part}/ subfolder; the download looks incomplete.")
    distilled = index.get("is_distilled", False)
    if not isinstance(distilled, bool):
        raise ValueError(f"model folder {root}: model_index.json is_distilled={distilled!r} must be true or false.")
    found = flavour_of_folder(pipeline_class=cls, transformer_config=_read_json(
        root / "transformer" / "config.json", what="transformer config"), where=f"model folder {root}")
    if flavour is not None:
        check_flavour_matches(flavour, found, where=f"model folder {root}", is_distilled=distilled)
    folder = ModelFolder(
        root=root,
        transformer_file=_check_single_file(transformer_file, what="transformer file"),
        vae_file=_check_single_file(vae_file, what="VAE file"),
        flavour=found,
        is_distilled=distilled and is_klein,
    )
    tcfg = folder.transformer_config()
    if tcfg.get("in_channels") != 128:
        raise ValueError(
            f"transformer config {folder.transformer_dir / 'config.json'}: in_channels={tcfg.get('in_channels')}, "
            "FLUX.2 has 128 (32 latent channels, 2x2 patchified). This is not a FLUX.2 transformer."
        )
    if bool(tcfg.get("guidance_embeds", True)) != folder.spec.has_guidance_embedding:
        raise ValueError(
            f"transformer config {folder.transformer_dir / 'config.json'}: guidance_embeds={tcfg.get('guidance_embeds')}"
            f", but {folder.spec.title} {'has' if folder.spec.has_guidance_embedding else 'has no'} guidance embedding; "
            "the transformer does not belong to this pipeline."
        )
    vcfg = folder.vae_config()
    if vcfg.get("latent_channels") != 32:
        raise ValueError(
            f"VAE config {folder.vae_dir / 'config.json'}: latent_channels={vcfg.get('latent_channels')}, "
            "FLUX.2's VAE has 32. This is not a FLUX.2 VAE."
        )
    text_cfg = folder.text_encoder_config()
    expected_features = 3 * text_hidden_size(text_cfg)
    if tcfg.get("joint_attention_dim") != expected_features:
        raise ValueError(
            f"model folder {root}: transformer joint_attention_dim={tcfg.get('joint_attention_dim')} does not match "
            f"3 x text encoder hidden size ({expected_features}); the text encoder and transformer do not belong together."
        )
    layers = folder.spec.text_hidden_layers
    if text_num_layers(text_cfg) < max(layers):
        raise ValueError(
            f"text encoder {folder.text_encoder_dir}: {text_num_layers(text_cfg)} layers; {folder.spec.title} reads "
            f"hidden states {', '.join(map(str, layers))}, so it needs at least {max(layers)}."
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
    """The tokenizer: dev's inside the PixtralProcessor folder (loading it needs no torchvision), klein's Qwen2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder.tokenizer_dir)


def load_text_encoder(folder: ModelFolder, *, precision: str = "bf16", device: str = "cpu"):
    """The flavour's text encoder: Mistral3ForConditionalGeneration (dev) or Qwen3ForCausalLM (klein)."""
    import transformers

    model_class = getattr(transformers, folder.spec.text_encoder_class)
    model = model_class.from_pretrained(folder.text_encoder_dir, dtype=torch_dtype(precision), use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def load_vae(folder: ModelFolder, *, precision: str = "fp32", device: str = "cpu"):
    from diffusers import AutoencoderKLFlux2

    dtype = torch_dtype(precision)
    if folder.vae_file is not None:
        vae = AutoencoderKLFlux2.from_single_file(folder.vae_file, config=str(folder.vae_dir), torch_dtype=dtype)
    else:
        vae = AutoencoderKLFlux2.from_pretrained(folder.vae_dir, torch_dtype=dtype, use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def load_transformer(folder: ModelFolder, *, precision: str = "bf16", device: str = "cpu",
                     after_block: Callable[[str, Any], None] | None = None):
    """The transformer in `precision` on `device`, frozen, holding each weight once.

    From the diffusers folder the weights are read straight into the model's own tensors (empty_transformer, then
    fill_from_safetensors): no state dict beside the module and no memory map of the files stays resident. On an
    accelerator only one tensor at a time passes through host memory. after_block(name, block) runs once each
    block's weights are read, before the next block's are (quantize.py quantizes there, so only one block is
    ever unquantized); with it the model stays on the CPU for the callback to place. A single-file transformer
    (ComfyUI layout, fused keys converted by diffusers) loads whole first.
    """
    dtype = torch_dtype(precision)
    if folder.transformer_file is not None:
        from diffusers import Flux2Transformer2DModel

        model = Flux2Transformer2DModel.from_single_file(
            folder.transformer_file, config=str(folder.transformer_dir), torch_dtype=dtype
        )
        if after_block is not None:
            for name, block in _named_blocks(model):
                after_block(name, block)
            return model.eval().requires_grad_(False)
        return model.to(device).eval().requires_grad_(False)
    model = empty_transformer(folder, dtype=dtype, device="cpu" if after_block is not None else device)
    fill_from_safetensors(model, folder, after_block=after_block)
    return model


def scheduler_config(folder: ModelFolder) -> dict[str, Any]:
    return _read_json(folder.scheduler_dir / "scheduler_config.json", what="scheduler config")


# ------------------------------------------------------------------------------ loading without a full copy


def empty_transformer(folder: ModelFolder, *, dtype: Any = None, device: str = "cpu"):
    """The transformer with uninitialised weights of `dtype` (fp32 by default) on `device`, frozen and in eval mode.

    On the CPU the operating system backs them with memory only where they are written, so a rank that shards
    the model (FSDP2) before filling it never holds the whole. Fill the frozen weights with fill_from_safetensors
    (after sharding, or after replacing them by tensors of their final dtype); LoRA layers added in between are
    ordinary, initialised tensors. The dtype is set on the meta device, so no full-size cast is ever written.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    config = {k: v for k, v in folder.transformer_config().items() if not k.startswith("_")}
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    # As from_pretrained's torch_dtype: modules the class keeps in fp32 stay fp32 (FLUX.2 lists none). Cast per
    # tensor on the meta device (free), not with ModelMixin.to, which warns on every cast.
    keep_fp32 = set(Flux2Transformer2DModel._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep_fp32.intersection(name.split(".")):
                param.data = param.data.to(dtype or torch.float32)
    return model.to_empty(device=device).eval().requires_grad_(False)


class WeightFiles:
    """The safetensors files of one part of a model folder (`stem`.safetensors, or the shards its
    `stem`.safetensors.index.json lists), read with plain file reads (safetensors_reader): no memory map stays
    resident. Use as a context manager; files open when first read."""

    def __init__(self, directory: Path, *, stem: str, what: str) -> None:
        self.directory, self.what = directory, what
        self._open: dict[Path, SafetensorsFile] = {}
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, what=f"{what} weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{what} weight index {index} has no weight_map; re-download that file.")
            self.files = {name: directory / file for name, file in weight_map.items()}
            return
        single = directory / f"{stem}.safetensors"
        if not single.is_file():
            raise ValueError(f"{directory} holds neither {stem}.safetensors nor its .index.json; the {what} weights "
                             "are missing (re-download them).")
        self.files = {name: single for name in self._handle(single).tensors}

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def _handle(self, path: Path):
        from .safetensors_reader import SafetensorsFile

        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise ValueError naming the file when it lacks `key` or holds it in another shape."""
        if key not in self.files:
            raise ValueError(f"{self.directory}: the {self.what} weights have no tensor {key!r}; the folder does not "
                             "match its config.json (re-download or re-convert it).")
        info = self._handle(self.files[key]).tensors.get(key)
        if info is None or info.shape != tuple(shape):
            found = "no such tensor" if info is None else f"shape {info.shape}"
            raise ValueError(f"{self.files[key]}: {key} has {found}, the model expects {tuple(shape)}; the weights "
                             "do not match config.json (re-download or re-convert them).")

    def read(self, key: str, *, out: Any, start: int = 0) -> int:
        """Fill `out` with rows start.. of `key`; returns the bytes read from the file."""
        handle = self._handle(self.files[key])
        handle.read_rows(key, start=start, out=out)
        return out.numel() * handle.tensors[key].dtype.itemsize


def transformer_weights(folder: ModelFolder) -> WeightFiles:
    return WeightFiles(folder.transformer_dir, stem="diffusion_pytorch_model", what="transformer")


def fill_from_safetensors(model: Any, folder: ModelFolder, *,
                          after_block: Callable[[str, Any], None] | None = None) -> int:
    """Read every frozen weight of `model` (plain, or an FSDP2 DTensor shard on dim 0) from the folder's
    safetensors files into the tensor itself: a shard reads only its own rows (WeightFiles, no mmap).
    PEFT's `.base_layer` is not part of the file's names. With after_block, the weights outside the blocks are
    read first, then each block's, each followed by after_block(name, block). Returns the bytes read. Raises
    ValueError naming a weight the files do not hold or hold in another shape, before reading any."""
    import torch

    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    keys = {name: name.replace(".base_layer.", ".") for name in frozen}
    read = 0
    with transformer_weights(folder) as files, torch.no_grad():
        for name, param in frozen.items():
            files.check(keys[name], tuple(param.shape))
        blocks = _named_blocks(model) if after_block is not None else []
        in_block = tuple(f"{name}." for name, _ in blocks)
        groups = [("", None, [n for n in frozen if not n.startswith(in_block)])]
        groups += [(name, block, [n for n in frozen if n.startswith(f"{name}.")]) for name, block in blocks]
        for group, block, names in groups:
            for name in names:
                # pop: after_block may replace the weight (quanto), and this dict must not keep the old one
                local, start = _local_rows(frozen.pop(name))
                if local.numel():
                    read += files.read(keys[name], out=local, start=start)
                del local
            if block is not None:
                after_block(group, block)
    return read


def fill_text_encoder_layers(text_encoder: Any, folder: ModelFolder, *, layers_name: str,
                             after_layer: Callable[[str, Any], None]) -> bool:
    """Give each decoder layer of a loaded text encoder freshly read weights, one layer at a time, each followed by
    after_layer(name, layer) (quantize.py quantizes there): the layer's weights as loaded, mapped from the files
    and never touched, are dropped unread, so host memory holds one layer in the load dtype at a time. Returns
    False, reading nothing, when the files' names for the layers cannot be matched (the caller then works on the
    weights as loaded)."""
    import torch

    layers = text_encoder.get_submodule(layers_name)
    with WeightFiles(folder.text_encoder_dir, stem="model", what="text encoder") as files:
        # The checkpoint may name the layers otherwise (Mistral3 files say language_model.model.layers): find the
        # one prefix under which layer 0's first weight is stored.
        first = next(iter(layers[0].named_parameters()))[0]
        tail = f"0.{first}"
        prefixes = {key[: -len(tail)] for key in files.files if key.endswith(f"layers.{tail}")}
        if len(prefixes) != 1:
            return False
        prefix = prefixes.pop()
        for i, layer in enumerate(layers):
            for name, param in layer.named_parameters():
                files.check(f"{prefix}{i}.{name}", tuple(param.shape))
        with torch.no_grad():
            for i, layer in enumerate(layers):
                for name, param in list(layer.named_parameters()):
                    fresh = torch.empty(param.shape, dtype=param.dtype, device=param.device)
                    files.read(f"{prefix}{i}.{name}", out=fresh)
                    param.data = fresh
                after_layer(f"{layers_name}.{i}", layer)
    return True


def _named_blocks(model: Any) -> list[tuple[str, Any]]:
    """(name, block) of the double then the single blocks."""
    return [(f"{prefix}.{i}", block) for prefix in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(model, prefix))]


def _local_rows(param: Any) -> tuple[Any, int]:
    """(this process's part of param, its first row): an FSDP2 Shard(0) DTensor holds torch.chunk's rows."""
    import math

    if not hasattr(param, "to_local"):
        return param.data, 0
    rank = param.device_mesh.get_local_rank()
    chunk = math.ceil(param.shape[0] / param.device_mesh.size())
    return param.to_local(), min(rank * chunk, param.shape[0])
