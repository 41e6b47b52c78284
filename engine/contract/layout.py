"""The models folder: which folders hold which files, and which file suffixes are weights (torch-free).

The engine scans these folders (engine/formats/model_files.py, the `<lora:name>` tags), the launcher lists them
(launcher/models.py, launcher/loras.py); both read the names from here. ComfyUI's names come first, then Forge's
(A1111's) for the same files; the engine tells a file's role by its tensor names, so a file in any of them works.
"""

from __future__ import annotations

# ComfyUI's folders. A model to pick: checkpoints (all-in-one), diffusion_models (unet: its older name).
CHECKPOINTS = "checkpoints"
DIFFUSION_MODELS = "diffusion_models"
UNET = "unet"
TEXT_ENCODERS = "text_encoders"
CLIP = "clip"  # text_encoders' older name
VAE = "vae"
LORAS = "loras"
STYLE_MODELS = "style_models"  # FLUX.1 Redux
CLIP_VISION = "clip_vision"  # SigLIP, for Redux
CONTROLNET = "controlnet"
MODEL_PATCHES = "model_patches"
DEPTH = "depth"  # a Depth Anything model for depth preprocessing

# Forge's (A1111's) names for the same files.
FORGE_MODELS = "Stable-diffusion"
FORGE_TEXT_ENCODERS = "text_encoder"
FORGE_VAE = "VAE"
FORGE_LORAS = "Lora"

# Tokenizer folders (the bootstrap downloads them; --clip-tokenizer/--t5-tokenizer override).
TOKENIZERS = "tokenizers"
CLIP_TOKENIZER = f"{TOKENIZERS}/clip_l"
T5_TOKENIZER = f"{TOKENIZERS}/t5xxl"
QWEN3_TOKENIZER = f"{TOKENIZERS}/qwen3"

# The folders the engine scans for the four roles (transformer, CLIP, T5, VAE), in search order (later
# ComfyUI folders are the older names), then Forge's.
ROLE_FOLDERS = (DIFFUSION_MODELS, UNET, CHECKPOINTS, TEXT_ENCODERS, CLIP, VAE)
FORGE_ROLE_FOLDERS = (FORGE_MODELS, FORGE_TEXT_ENCODERS, FORGE_VAE)
# Folders whose files are models to pick (the others hold their parts).
MODEL_FOLDERS = (CHECKPOINTS, DIFFUSION_MODELS, UNET, FORGE_MODELS)
# LoRAs: ComfyUI's folder, then Forge's; the first that exists is where `<lora:name>` tags look.
LORA_FOLDERS = (LORAS, FORGE_LORAS)
# The extra model folders of the editing, control and Redux features.
EXTRA_FOLDERS = (STYLE_MODELS, CLIP_VISION, CONTROLNET, MODEL_PATCHES, DEPTH)
# Every folder of weight files the launcher lists: ComfyUI's, then Forge's.
LISTED_FOLDERS = (CHECKPOINTS, DIFFUSION_MODELS, UNET, TEXT_ENCODERS, CLIP, VAE, LORAS) + (
    FORGE_MODELS,
    FORGE_TEXT_ENCODERS,
    FORGE_VAE,
    FORGE_LORAS,
)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
GGUF_SUFFIXES = (".gguf",)
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + GGUF_SUFFIXES
LORA_SUFFIXES = SAFETENSORS_SUFFIXES
