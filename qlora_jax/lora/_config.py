"""``LoraConfig``: PEFT's LoRA settings, same names and defaults (peft 0.22)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT's ``LoraConfig`` fields that this library implements.

    r: adapter rank. lora_alpha: scaling numerator (scaling = lora_alpha / r, or
    lora_alpha / sqrt(r) with ``use_rslora``). lora_dropout: dropout on the adapter's input.
    target_modules: a list of module-name suffixes (``["q_proj", "v_proj"]``), a regular
    expression ``re.fullmatch``-ed against Hugging Face module names
    (``model.layers.3.self_attn.q_proj``), "all-linear" (every linear but the LM head), or None
    (PEFT's default for the architecture: q_proj and v_proj). layers_to_transform: layer indices
    to adapt (None: all). init_lora_weights: True (A kaiming-uniform, B zeros), "gaussian" (A
    normal with std 1/r, B zeros) or False (both random, for tests). bias: only "none".
    modules_to_save: not built yet (refused).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: Sequence[str] | None = None
    layers_to_transform: Sequence[int] | None = None

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r} is not supported; expected 'none'")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not supported; expected True, False "
                             "or 'gaussian'")
        if self.modules_to_save:
            raise ValueError(f"modules_to_save={self.modules_to_save!r} is not built yet; expected None")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers_to_transform is not None:
            layers = (self.layers_to_transform,) if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            object.__setattr__(self, "layers_to_transform", tuple(int(i) for i in layers))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
