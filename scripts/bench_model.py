"""Forward and generation throughput of qlora_jax against transformers (+ bitsandbytes 4-bit) on CPU.

    python scripts/bench_model.py [--hidden 512 --layers 8 --intermediate 1408 --heads 8 --vocab 32000]
        [--batch 4 --seq 256] [--prompt 32 --new 64] [--repeats 5]

One random Llama checkpoint (bf16, written by transformers), the same inputs for every stack,
median of --repeats after a warm-up (compilation excluded). Prints a Markdown table. (bitsandbytes'
CPU inference path needs in_features divisible by the blocksize: hence 1408, not 1376.)
"""

import argparse
import datetime
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import qlora_jax
from qlora_jax.bench import median_seconds
from qlora_jax.models import write_tiny_checkpoint


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("hidden", 512), ("layers", 8), ("intermediate", 1408), ("heads", 8), ("vocab", 32000),
                          ("batch", 4), ("seq", 256), ("prompt", 32), ("new", 64), ("repeats", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    ckpt = write_tiny_checkpoint(tempfile.mkdtemp(), "llama", hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 intermediate_size=a.intermediate, num_attention_heads=a.heads,
                                 num_key_value_heads=a.heads, vocab_size=a.vocab, dtype="bfloat16")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, a.vocab, (a.batch, a.seq))
    prompt = rng.integers(0, a.vocab, (1, a.prompt))
    print(f"{datetime.date.today()}; llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; forward "
          f"{a.batch}x{a.seq} tokens, generation 1x{a.prompt} prompt + {a.new} new; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print("| stack | weights | forward tokens/s | generate tokens/s |")
    print("|---|---|---|---|")
    for label, dtype, quant in [("float32", jnp.float32, None), ("bfloat16", jnp.bfloat16, None),
                                ("nf4 (bf16 compute)", jnp.bfloat16, qlora_jax.QuantConfig())]:
        model = qlora_jax.from_pretrained(ckpt, quantization=quant, dtype=dtype)
        graphdef, state = nnx.split(model)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
        t_fwd = median_seconds(lambda: jax.block_until_ready(fwd(state, ids)), a.repeats)
        t_gen = median_seconds(lambda: jax.block_until_ready(qlora_jax.generate(model, prompt, max_new_tokens=a.new)),
                       a.repeats)
        print(f"| qlora_jax | {label} | {ids.size / t_fwd:,.0f} | {a.new / t_gen:,.1f} |")
    hf_variants = [("float32", dict(dtype=torch.float32)), ("bfloat16", dict(dtype=torch.bfloat16)),
                   ("nf4 (bitsandbytes, bf16 compute)", dict(dtype=torch.bfloat16, device_map="cpu",
                    quantization_config=transformers.BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype=torch.bfloat16)))]
    for label, kw in hf_variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, **kw).eval()
        x, pr = torch.tensor(ids), torch.tensor(prompt)
        with torch.no_grad():
            t_fwd = median_seconds(lambda: hf(x), a.repeats)
            t_gen = median_seconds(lambda: hf.generate(pr, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False),
                           a.repeats)
        print(f"| transformers | {label} | {ids.size / t_fwd:,.0f} | {a.new / t_gen:,.1f} |")


if __name__ == "__main__":
    main()
