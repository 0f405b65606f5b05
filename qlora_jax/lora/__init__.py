"""LoRA adapters on a loaded model: configuration, injection, the trainable mask, PEFT format."""

from ._config import LoraConfig
from ._inject import (DEFAULT_TARGETS, apply_lora, linear_modules, lora_configs, merge_adapters, set_adapter,
                      unmerge_adapters)
from ._merge_export import save_merged
from ._layers import LoraAdapter, LoraLayerMask, LoraLinear, LoraParam
from ._peft import load_adapter, read_adapter_config, save_adapter
from ._trainable import build_optimizer, count_parameters, is_trainable, print_trainable_parameters, trainable_mask

__all__ = [
    "DEFAULT_TARGETS", "LoraAdapter", "LoraConfig", "LoraLayerMask", "LoraLinear", "LoraParam", "apply_lora",
    "build_optimizer", "count_parameters", "is_trainable", "linear_modules", "load_adapter", "lora_configs", "merge_adapters",
    "print_trainable_parameters", "read_adapter_config", "save_adapter", "save_merged", "set_adapter",
    "trainable_mask", "unmerge_adapters",
]
