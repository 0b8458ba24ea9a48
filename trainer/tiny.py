"""Tiny, randomly initialised FLUX.2 in the exact on-disk layout of black-forest-labs/FLUX.2-dev.

The real classes (diffusers Flux2Transformer2DModel, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler;
transformers Mistral3ForConditionalGeneration and PixtralProcessor) are built with small widths and
saved through Flux2Pipeline.save_pretrained, so every loader that reads real weights reads these too.
What is kept from the real model because our code depends on it:
  - 32 latent channels -> 128 after 2x2 patchify; 8x VAE downscale (4 levels) -> 16 px per token;
  - 4-axis RoPE (32, 32, 32, 32), head dim 128 (ComfyUI's FLUX.2 classes assume it);
  - several double and single blocks, so negative block indices and both block kinds are exercised;
  - a Mistral3 text encoder with 32 decoder layers, so hidden states 10, 20 and 30 exist;
  - a Mistral chat template with [SYSTEM_PROMPT]/[INST] special tokens and a pad token.
For tests and the demo only: the weights are random and the images it makes are noise-like.

`flavour="klein-4b"` / `"klein-9b"` writes a tiny FLUX.2 [klein] instead, through Flux2KleinPipeline.save_pretrained
(model_index.json with is_distilled; `distilled=True` for the step-distilled twin): the real block counts (5 + 20,
8 + 24; trainer/flavours.py), one 128-wide head, no guidance embedding, a Qwen3ForCausalLM text encoder with 28
layers (hidden states 9, 18 and 27 exist) and a Qwen2 tokenizer with the Qwen3 chat template, built offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TEXT_HIDDEN = 32
TEXT_LAYERS = 32

TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=128,
    num_attention_heads=2,
    joint_attention_dim=3 * TEXT_HIDDEN,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=True,
)

VAE_CONFIG: dict = dict(
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=32,
    sample_size=256,
    batch_norm_eps=1e-4,
)

# The scheduler config FLUX.2-dev ships (dynamic shifting; the pipeline passes the empirical mu).
SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

# Mistral's special tokens at their real ids, so ids in tests mean what they mean on the real model.
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]

# Same structure as Mistral-Small-3.1's template: bos, system prompt block, [INST] user [/INST],
# content either a string or a list of {"type": "text"|"image"} blocks.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported') }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)

_CORPUS = """
You are an AI that reasons about image descriptions. You give structured responses focusing on object
relationships, object attribution and actions without speculation.
a photo of a red cube on a blue floor, a green sphere in the sky, a yellow cat sitting on a wooden table
a painting of mountains at sunset with a river, portrait of a woman with short hair, studio lighting
a dog running on the beach, city street at night with neon signs, close-up of a flower, black and white
the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 , . ! ? ' " ( ) - : ;
"""


def build_tokenizer():
    """A byte-level BPE tokenizer with Mistral's special tokens, trained offline on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=131072,
        extra_special_tokens={"image_token": "[IMG]"},
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The real tokenizer/ folder is a PixtralProcessor. Instantiating one needs torchvision, which this
# project does not require, so the processor's two config files are written as the real repo has them
# and the tokenizer inside is what our code (and Flux2Pipeline, when handed tokenizer=) loads.
PROCESSOR_CONFIG: dict = {
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
    "image_token": "[IMG]",
    "patch_size": 16,
    "processor_class": "PixtralProcessor",
    "spatial_merge_size": 2,
}
PREPROCESSOR_CONFIG: dict = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "PixtralImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": {"height": 16, "width": 16},
    "processor_class": "PixtralProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 64},
}


def _write_processor_files(tokenizer_dir: Path) -> None:
    for name, data in (("processor_config.json", PROCESSOR_CONFIG), ("preprocessor_config.json", PREPROCESSOR_CONFIG)):
        (tokenizer_dir / name).write_text(json.dumps(data, indent=2) + "\n")


def build_text_encoder(vocab_size: int):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=TEXT_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=1_000_000_000.0,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=1,
            head_dim=16,
            image_size=64,
            patch_size=16,
            num_channels=3,
        ),
        image_token_index=10,
        spatial_merge_size=2,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------------------- klein

KLEIN_TEXT_HIDDEN = 32
KLEIN_TEXT_LAYERS = 28

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# What Qwen3's template renders for plain user/assistant turns: <|im_start|>role\ncontent<|im_end|>\n, then the
# generation prompt; enable_thinking=False closes an empty think block, as the real template does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def build_qwen_tokenizer():
    """A Qwen2Tokenizer (Qwen's pre-tokenizer regex, byte-level BPE) trained offline on a fixed corpus, with
    Qwen3's special tokens and chat template. Right padding with <|endoftext|>, as the tokenizer class defaults."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    qwen = Qwen2Tokenizer(vocab=tok.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          model_max_length=131072)
    qwen.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    return qwen


def build_qwen_text_encoder(vocab_size: int, *, tie_word_embeddings: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=KLEIN_TEXT_HIDDEN, intermediate_size=64,
                         num_hidden_layers=KLEIN_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                         tie_word_embeddings=tie_word_embeddings)
    return Qwen3ForCausalLM(config)


def klein_transformer_config(flavour: str) -> dict:
    """The tiny klein transformer: the flavour's real block counts and no guidance embedding, one 128-wide head."""
    from .flavours import KLEIN_FLAVOURS, SPECS

    if flavour not in KLEIN_FLAVOURS:
        raise ValueError(f"make-tiny --flavour {flavour!r}: klein flavours are {list(KLEIN_FLAVOURS)}.")
    real = SPECS[flavour].transformer
    return dict(TRANSFORMER_CONFIG, num_layers=real["num_layers"], num_single_layers=real["num_single_layers"],
                num_attention_heads=1, joint_attention_dim=3 * KLEIN_TEXT_HIDDEN, guidance_embeds=False)


def _randomise_batch_norm(vae, generator) -> None:
    """Give the VAE's frozen latent statistics non-trivial values, so normalising is visible in tests."""
    import torch

    bn = vae.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 0.5 + 0.75)


def make_tiny(*, out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False, flavour: str = "dev",
              distilled: bool = False) -> Path:
    """Write a tiny random FLUX.2 pipeline (dev, or klein-4b / klein-9b base or distilled) to out_dir and return
    the path.

    Deterministic for a seed. Refuses to write into a non-empty folder unless overwrite is set,
    so a user's files are never replaced by accident.
    """
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    from .flavours import FLAVOURS

    if flavour not in FLAVOURS:
        raise ValueError(f"make-tiny --flavour {flavour!r} is not a FLUX.2 flavour; choose one of {list(FLAVOURS)}.")
    if distilled and flavour == "dev":
        raise ValueError("make-tiny --distilled: only FLUX.2 [klein] has a step-distilled variant; drop --distilled "
                         "or choose --flavour klein-4b / klein-9b.")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"make-tiny --out {out}: the folder is not empty; choose an empty or new folder "
                "(or pass --overwrite to replace a tiny model written there before)."
            )
        if not (out / "model_index.json").is_file():
            raise ValueError(
                f"make-tiny --out {out}: --overwrite only replaces a FLUX.2 model folder "
                "(model_index.json missing); choose an empty or new folder."
            )

    if flavour != "dev":
        return _make_tiny_klein(out, seed=seed, flavour=flavour, distilled=distilled)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(vocab_size=len(tokenizer))
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(**VAE_CONFIG)
    _randomise_batch_norm(vae, generator)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)

    pipe = Flux2Pipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    _write_processor_files(out / "tokenizer")
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    _write_info(out, seed=seed, flavour="dev", distilled=False)
    return out


def _write_info(out: Path, *, seed: int, flavour: str, distilled: bool) -> None:
    info = {"note": "tiny random FLUX.2 for tests; not a real model", "seed": seed, "flavour": flavour,
            "distilled": distilled}
    (out / "TINY_MODEL.json").write_text(json.dumps(info, indent=2) + "\n")


def _make_tiny_klein(out: Path, *, seed: int, flavour: str, distilled: bool) -> Path:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    # Qwen3-4B ties its input and output embeddings, Qwen3-8B does not.
    text_encoder = build_qwen_text_encoder(len(tokenizer), tie_word_embeddings=flavour == "klein-4b")
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(**klein_transformer_config(flavour))
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(**VAE_CONFIG)
    _randomise_batch_norm(vae, generator)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
                              text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=transformer,
                              is_distilled=distilled)
    pipe.save_pretrained(out, safe_serialization=True)
    _write_info(out, seed=seed, flavour=flavour, distilled=distilled)
    return out
