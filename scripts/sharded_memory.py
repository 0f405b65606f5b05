"""Per-device memory of a QLoRA train step on a device mesh, from shapes alone.

Writes a config.json of the chosen shape (or reads --model), builds the abstract model with LoRA,
and for each mesh lowers and compiles the sharded train step (qlora_jax.sharding.step_memory):
nothing is allocated, so a 70B step is reported on a laptop with forced CPU devices. Prints a
Markdown table for docs/benchmarks.md.

    python scripts/sharded_memory.py --preset 70b --devices 8 --mesh 8,1,1 1,8,1 2,4,1 1,4,2
"""

import argparse
import json
import os
import sys
import tempfile

PRESETS = {  # Hugging Face config.json fields
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),  # Llama-2-70B
    "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=64, vocab_size=32000),  # LLaMA-65B (the QLoRA paper's)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3-8B
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="70b")
    p.add_argument("--model", default=None, help="a checkpoint directory (its config.json) instead of a preset")
    p.add_argument("--devices", type=int, default=8, help="forced CPU devices (set before JAX starts)")
    p.add_argument("--mesh", nargs="+", default=["8,1,1", "1,8,1", "2,4,1", "1,4,2"], help="data,fsdp,tensor")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1, help="per data-parallel device")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--optim", default="paged_adamw_32bit")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import jax.numpy as jnp

    import qlora_jax
    from qlora_jax.sharding import abstract_lora_model, make_mesh, step_memory

    path = args.model
    if path is None:
        path = tempfile.mkdtemp()
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
                  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16", "hidden_act": "silu", **PRESETS[args.preset]}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    lora = qlora_jax.LoraConfig(r=args.r, lora_alpha=16, target_modules="all-linear")
    model = abstract_lora_model(path, lora, quantization=qlora_jax.QuantConfig(), dtype=getattr(jnp, args.dtype))
    print(f"{args.model or args.preset}: NF4 + double quant, LoRA r={args.r} on all linear layers, {args.dtype}, "
          f"gradient checkpointing, {args.optim}, seq {args.seq_length}, batch {args.batch_size} per data-parallel "
          f"device, {jax.device_count()} {jax.devices()[0].platform.upper()} devices (compiled by XLA:CPU)\n")
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    print("| mesh (data x fsdp x tensor) | base | adapters | opt. state device / host | activations + working "
          "buffers (XLA:CPU) | compiled peak (XLA:CPU) | estimated peak, bf16 (GiB per device) |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.mesh:
        shape = tuple(int(x) for x in spec.split(","))
        m = step_memory(model, make_mesh(*shape), batch_size=args.batch_size, seq_length=args.seq_length,
                        optim=args.optim)
        print(f"| {' x '.join(map(str, shape))} | {gib(m.base)} | {gib(m.adapters)} | {gib(m.optimizer_state)} / "
              f"{gib(m.optimizer_state_host)} | {gib(m.temporaries)} | {gib(m.peak)} | {gib(m.estimated_peak)} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
