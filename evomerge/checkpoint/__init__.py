"""HF checkpoints in and out: reading, layout, compatibility, writing."""

from .compat import CompatReport, check_compatible
from .layout import ModelLayout, detect_layout
from .lora import LoraFactors, LoraReader, save_lora_adapter
from .opener import clear_reader_cache, open_checkpoint
from .reader import TOKENIZER_FILES, CheckpointReader, read_safetensors_header
from .writer import atomic_output_dir, parse_size, render_model_card, write_checkpoint

__all__ = [
    "TOKENIZER_FILES",
    "CheckpointReader",
    "CompatReport",
    "LoraFactors",
    "LoraReader",
    "ModelLayout",
    "atomic_output_dir",
    "check_compatible",
    "clear_reader_cache",
    "detect_layout",
    "open_checkpoint",
    "parse_size",
    "read_safetensors_header",
    "render_model_card",
    "save_lora_adapter",
    "write_checkpoint",
]
