"""The ``qlora-jax`` command.

Subcommands so far: ``info`` (a checkpoint's shape and its 4-bit storage; ``--quantize`` streams
and quantizes every tensor for real). ``train``, ``generate``, ``merge`` and ``launch`` arrive
with the issues that build them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import quant
from .models import iter_tensors, resolve_checkpoint, tensor_specs


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant-type", default="nf4", choices=quant.QUANT_TYPES, help="4-bit data type (default nf4)")
    p.add_argument("--blocksize", type=int, default=64, choices=quant.BLOCKSIZES_4BIT,
                   help="elements per absmax block (default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the absmax values in fp32 instead of 8 bits")


def _config_line(ckpt) -> str:
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(ckpt)
    except Exception as e:  # a checkpoint without a usable config.json still has tensors to report
        return f"config: unreadable ({type(e).__name__}: {e})"
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    return "config: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in keys if hasattr(cfg, k))


def cmd_info(args) -> int:
    import jax
    import numpy as np

    ckpt = resolve_checkpoint(args.model, revision=args.revision)
    print(f"checkpoint: {ckpt}")
    print(_config_line(ckpt))
    kw = dict(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant)
    print(f"quantization: {args.quant_type}, blocksize {args.blocksize}, "
          f"double quantization {'on' if args.double_quant else 'off'}")
    specs = tensor_specs(ckpt)
    if not args.quantize:
        tree = jax.eval_shape(lambda t: quant.quantize_params(t, **kw), specs)
        print(quant.storage_report(tree))
        return 0

    shapes, sq_err, sq_ref, n_bytes = {}, 0.0, 0.0, 0
    start = time.perf_counter()
    for name, array in iter_tensors(ckpt):  # one tensor in host memory at a time
        x = jax.numpy.asarray(array)
        if quant.default_rule(name, x):
            q = quant.quantize(x, **kw)
            diff = np.asarray(quant.dequantize(q, jax.numpy.float32)) - np.asarray(x, np.float32)
            sq_err += float(np.sum(diff * diff))
            sq_ref += float(np.sum(np.square(np.asarray(x, np.float32))))
            n_bytes += x.nbytes
            shapes[name] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), q)
        else:
            shapes[name] = jax.ShapeDtypeStruct(x.shape, x.dtype)
    elapsed = time.perf_counter() - start
    print(quant.storage_report(shapes))
    rel = (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0
    print(f"quantized {n_bytes / 2**20:.1f} MiB of linear weights in {elapsed:.2f} s; "
          f"relative RMS error of the dequantized weights: {rel:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-jax", description="QLoRA fine-tuning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="a checkpoint's configuration and its 4-bit storage",
                          description="Print a checkpoint's configuration and the storage of its quantized form.")
    info.add_argument("model", help="checkpoint directory or hub id")
    info.add_argument("--revision", default=None, help="hub revision (with a hub id)")
    info.add_argument("--quantize", action="store_true",
                      help="stream and quantize every tensor for real (default: shapes only)")
    _add_quant_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers advises installing torch on import; configs and tokenizers need no torch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"qlora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
