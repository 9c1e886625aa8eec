"""Parameter-efficient fine-tuning: LoRA, DoRA, QLoRA (NF4 base), (IA)³, trainable token rows,
modules trained as full copies, prompt tuning, selective training, and adapters in PEFT's on-disk format."""

from lmforge.peft.adapters import (
    adapter_base, adapter_state, is_adapter_dir, load_adapter, load_with_adapter, merge_and_save, read_adapter,
    save_adapter,
)
from lmforge.peft.ia3 import IA3Linear, add_ia3
from lmforge.peft.lora import (
    FrozenLinear, LoRALinear, add_lora, disable_adapters, merge_and_unload, merge_lora, unmerge_lora,
)
from lmforge.peft.method import AdapterConfig, apply_method, parameter_counts, trainable_parameters
from lmforge.peft.prompt_tuning import PromptTuned, prompt_tuning
from lmforge.peft.saved_modules import SavedModule, add_modules_to_save
from lmforge.peft.selective import train_only
from lmforge.peft.tokens import TrainableTokens, add_trainable_tokens

__all__ = [
    "AdapterConfig", "FrozenLinear", "IA3Linear", "LoRALinear", "PromptTuned", "SavedModule", "TrainableTokens",
    "adapter_base", "adapter_state", "add_ia3", "add_lora", "add_modules_to_save", "add_trainable_tokens",
    "apply_method", "disable_adapters", "is_adapter_dir", "load_adapter", "load_with_adapter", "merge_and_save",
    "merge_and_unload", "merge_lora", "parameter_counts", "prompt_tuning", "read_adapter", "save_adapter",
    "train_only", "trainable_parameters", "unmerge_lora",
]
