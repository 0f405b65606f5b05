"""The same QLoRA job in PyTorch (transformers + bitsandbytes + PEFT), Qwix and qlora_jax, side by side.

    python scripts/compare_torch.py --preset tiny|small|1b [--model PATH] [--steps N]
        [--dtype bfloat16|float32] [--stacks reference,qlora_jax,qwix] [--gradient-checkpointing]
        --output-dir DIR

Writes DIR/comparison.json, DIR/comparison.md and PNG plots (the logic: ``qlora_jax.compare``).
"""

from qlora_jax.compare import main

if __name__ == "__main__":
    main()
