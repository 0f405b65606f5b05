"""Write a tiny random checkpoint (safetensors + config.json + a byte-level tokenizer with a chat template).

    python scripts/make_tiny_model.py out/tiny-llama [--arch llama|mistral|qwen2|qwen3] [--layers 4] [--hidden 256]

With torch installed, transformers builds and saves the model itself (any architecture); without
it (the demo's environment) a Llama is written with numpy, in the same format.
"""

import argparse
import importlib.util
import os

from qlora_jax.models import write_tiny_checkpoint, write_tiny_llama

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=1024)
    a = p.parse_args()
    sizes = dict(num_hidden_layers=a.layers, hidden_size=a.hidden, intermediate_size=a.intermediate,
                 vocab_size=a.vocab)
    if importlib.util.find_spec("torch") is not None:
        out = write_tiny_checkpoint(a.path, a.arch, num_attention_heads=8, num_key_value_heads=4, dtype="bfloat16",
                                    **sizes)
    elif a.arch == "llama":
        out = write_tiny_llama(a.path, **sizes)
    else:
        raise SystemExit(f"--arch {a.arch} needs torch (pip install -e '.[test]'); without it only llama")
    print(f"wrote {out}")
