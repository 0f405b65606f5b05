"""Loading streams: host memory holds about one tensor, never the whole full-precision model."""

import subprocess
import sys
import textwrap

from qlora_jax.models import write_tiny_llama

PROBE = textwrap.dedent("""
    import sys, threading, time
    import jax, jax.numpy as jnp
    import qlora_jax

    def rss_anon():  # anonymous resident memory: memory-mapped safetensors pages are the page cache's
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    # Warm-up on a 2-layer twin of the same widths: imports, runtime and compiled programs are
    # a fixed cost, not what loading a bigger checkpoint adds.
    qlora_jax.from_pretrained(sys.argv[2], quantization=qlora_jax.QuantConfig(), dtype=jnp.bfloat16)
    base, peak, done = rss_anon(), [0], []

    def watch():
        while not done:
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=watch); t.start()
    model = qlora_jax.from_pretrained(sys.argv[1], quantization=qlora_jax.QuantConfig(), dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(model))))
    done.append(1); t.join()
    print(peak[0] - base, rss_anon() - base)
""")


def test_nf4_loading_peak_memory_is_well_under_the_checkpoint(tmp_path):
    shape = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                 vocab_size=8000)
    ckpt = write_tiny_llama(tmp_path / "ckpt", num_hidden_layers=24, **shape)
    twin = write_tiny_llama(tmp_path / "twin", num_hidden_layers=2, **shape)
    size = (ckpt / "model.safetensors").stat().st_size
    assert size > 500e6
    out = subprocess.run([sys.executable, "-P", "-c", PROBE, str(ckpt), str(twin)], check=True, capture_output=True,
                         text=True)
    peak, final = (int(v) for v in out.stdout.split())
    print(f"checkpoint {size / 2**20:.0f} MiB; anonymous memory while loading: peak +{peak / 2**20:.0f} MiB, "
          f"after +{final / 2**20:.0f} MiB")
    # What stays: NF4 linears (~0.52 bytes/param) and bf16 embeddings, about 30% of the checkpoint;
    # the peak adds one tensor in flight and the stacking of the layers.
    assert peak < 0.5 * size, (peak, size)
