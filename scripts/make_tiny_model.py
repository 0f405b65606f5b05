"""Write a tiny random Llama checkpoint (bf16 safetensors + config.json).

    python scripts/make_tiny_model.py out/tiny-llama [--layers 4] [--hidden 256]
"""

import argparse
import os

from qlora_jax.models import write_tiny_llama

if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no torch needed here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=1024)
    a = p.parse_args()
    out = write_tiny_llama(a.path, num_hidden_layers=a.layers, hidden_size=a.hidden,
                           intermediate_size=a.intermediate, vocab_size=a.vocab)
    print(f"wrote {out}")
