"""Training: the causal-LM loss, optimizer and schedules, and the pure train step."""

from ._memory import MemoryEstimate, compiled_memory, estimate_memory
from ._optim8bit import adamw_8bit
from ._paged import paged
from ._loss import IGNORE_INDEX, causal_lm_loss_sum
from ._optim import OPTIMIZERS, SCHEDULES, clip_by_global_norm_torch, make_optimizer, make_schedule, warmup_steps_for
from ._step import (LossScaleState, SplitModel, init_loss_scale, init_opt_state, make_train_step, merge_model,
                    split_model, train_step, update_model)

from ._trainer import train

__all__ = ["train", "MemoryEstimate", "compiled_memory", "estimate_memory", "IGNORE_INDEX", "OPTIMIZERS", "paged", "adamw_8bit", "LossScaleState", "SCHEDULES", "SplitModel", "init_loss_scale", "init_opt_state", "causal_lm_loss_sum", "clip_by_global_norm_torch",
           "make_optimizer", "make_schedule", "make_train_step", "merge_model", "split_model", "train_step",
           "update_model", "warmup_steps_for"]
