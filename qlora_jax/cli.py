"""The ``qlora-jax`` command.

Subcommands: ``info`` (a checkpoint's shape and its 4-bit or 8-bit storage; ``--quantize`` streams and
quantizes every tensor for real), ``generate`` (load, quantize, attach an adapter, complete
prompts), ``train`` (fine-tune from a run config), ``merge`` (fold an adapter into its base) and
``launch`` (several local processes that train as one).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import quant
from .models import iter_tensors, resolve_checkpoint, tensor_specs


def _add_quant_args(p: argparse.ArgumentParser, *, allow_none: bool = False) -> None:
    choices = (*quant.QUANT_TYPES, "int8", "none") if allow_none else (*quant.QUANT_TYPES, "int8")
    p.add_argument("--quant-type", default="nf4", choices=choices,
                   help="data type of the decoder linears: nf4 or fp4 (4-bit), int8 (LLM.int8(), transformers' "
                   "load_in_8bit)" + (", or none for a dense base" if allow_none else "") + " (default nf4)")
    p.add_argument("--llm-int8-threshold", type=float, default=6.0,
                   help="LLM.int8() outlier threshold for --quant-type int8 (default 6.0; 0 turns the "
                   "decomposition off)")
    p.add_argument("--blocksize", type=int, default=64, choices=quant.BLOCKSIZES_4BIT,
                   help="elements per absmax block (default 64)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the absmax values in fp32 instead of 8 bits")


def _quant_config(args, compute_dtype: str = "bfloat16") -> quant.QuantConfig | None:
    """The QuantConfig the quantization flags describe (None for --quant-type none)."""
    if args.quant_type == "none":
        return None
    if args.quant_type == "int8":
        return quant.QuantConfig(load_in_8bit=True, llm_int8_threshold=args.llm_int8_threshold)
    return quant.QuantConfig(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
                             compute_dtype=compute_dtype)


def _load_model(args, *, dtype: str, compute_dtype: str):
    """The base from ``args.model`` quantized as ``args`` say, with ``args.adapter`` attached."""
    import jax.numpy as jnp

    from .lora import load_adapter
    from .models import from_pretrained

    ckpt = resolve_checkpoint(args.model, revision=args.revision)
    quantization = _quant_config(args, compute_dtype)
    model = from_pretrained(ckpt, quantization=quantization, dtype=getattr(jnp, dtype))
    if args.adapter:
        load_adapter(model, args.adapter)
    return ckpt, model


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
    kw = _quant_config(args).quantize_kwargs()
    if args.quant_type == "int8":
        print(f"quantization: int8 (LLM.int8(), row-wise), outlier threshold {args.llm_int8_threshold}")
    else:
        print(f"quantization: {args.quant_type}, blocksize {args.blocksize}, "
              f"double quantization {'on' if args.double_quant else 'off'}")
    specs = tensor_specs(ckpt)
    if not args.quantize:
        tree = jax.eval_shape(lambda t: quant.quantize_params(t, **kw), specs)
        print(quant.storage_report(tree))
        _print_run_estimate(args, ckpt)
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


def _print_run_estimate(args, ckpt) -> None:
    """Trainable parameters and the estimated peak device memory of one training step, for the run
    that ``--config`` and the overrides describe (a run config's defaults otherwise)."""
    import jax.numpy as jnp

    from .config import load_config
    from .lora import apply_lora, count_parameters
    from .models import abstract_model
    from .train import estimate_memory

    config = load_config(args.config, [f"model={args.model}", *args.overrides])
    q = config.quantization if args.config or any(o.startswith("quantization.") for o in args.overrides) else \
        _quant_config(args)
    t, d = config.training, config.data
    model = abstract_model(ckpt, quantization=q, dtype=getattr(jnp, config.model.dtype),
                           scan_layers=config.model.scan_layers,
                           gradient_checkpointing=True if t.gradient_checkpointing else None)
    apply_lora(model, config.lora, seed=config.seed)
    trainable, total = count_parameters(model)
    print(f"LoRA r={config.lora.r}, targets {config.lora.target_modules!r}: trainable params: {trainable:,d} || "
          f"all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    kw = dict(batch_size=t.per_device_train_batch_size, seq_length=d.max_seq_length,
              micro_batches=t.gradient_accumulation_steps)
    kw["optimizer"] = t.optim
    print(f"estimated peak device memory of a training step (batch {kw['batch_size']} x "
          f"{kw['micro_batches']} micro-batches x {kw['seq_length']} tokens, {config.model.dtype}, {t.optim}):")
    print(estimate_memory(model, gradient_checkpointing=bool(t.gradient_checkpointing), **kw))
    other = estimate_memory(model, gradient_checkpointing=not t.gradient_checkpointing, **kw)
    size = f"{other.total / 2**30:.2f} GiB" if other.total >= 2**30 else f"{other.total / 2**20:.2f} MiB"
    print(f"with gradient checkpointing {'off' if t.gradient_checkpointing else 'on'} instead: {size}")


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from .generate import generate

    ckpt, model = _load_model(args, dtype=args.dtype, compute_dtype=args.dtype)
    tok = AutoTokenizer.from_pretrained(ckpt, padding_side="left")
    if tok.pad_token is None:  # as TRL: a missing pad token becomes the EOS token
        tok.pad_token = tok.eos_token
    texts = args.prompt
    if args.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
                 for t in texts]
    batch = tok(texts, return_tensors="np", padding=True, add_special_tokens=not args.chat)
    out = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                   do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id, seed=args.seed)
    prompt_len = batch["input_ids"].shape[1]
    for prompt, row in zip(args.prompt, out.tolist()):
        print(f"### {prompt}\n{tok.decode(row[prompt_len:], skip_special_tokens=True)}")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):  # no CONFIG, only overrides
        path, overrides = None, [path, *overrides]
    config = load_config(path, overrides)
    from .distributed import initialize, is_main_process

    initialize()  # several processes (qlora-jax launch, SLURM, ...) join one group; one needs nothing
    result = train(config)
    if is_main_process():
        print(f"done: {result['step']} steps, final loss {result['loss']:.4f}; adapter in "
              f"{config.output_dir}/adapter")
    return 0


def cmd_launch(args) -> int:
    from .distributed import launch

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if command[:1] == ["launch"]:
        raise ValueError("launch cannot launch itself; give the command to run, e.g. -- train run.yaml")
    return launch(command, num_processes=args.num_processes, cpu_devices_per_process=args.cpu_devices_per_process,
                  timeout=args.timeout, port=args.port)


def cmd_merge(args) -> int:
    from .lora import save_merged

    ckpt, model = _load_model(args, dtype="float32", compute_dtype="float32")
    report = save_merged(model, args.output, dtype=args.dtype, source=ckpt)
    print(f"merged {args.adapter} into {ckpt} (dequantized, not re-quantized) -> {args.output} ({args.dtype})")
    if args.quant_type != "none":
        print(f"a merge re-quantized to {args.quant_type} would have moved the merged weights by "
              f"{100 * report['requantized_drift']:.2f}% (relative RMS)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-jax", description="QLoRA fine-tuning in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="a checkpoint's configuration, 4-bit storage, trainable parameters and the "
                          "estimated peak memory of a training step",
                          description="Print a checkpoint's configuration, the storage of its quantized form, the "
                          "LoRA trainable parameters and an estimate of a training step's peak device memory "
                          "(weights, adapters, gradients, optimizer state, activations with and without "
                          "gradient checkpointing) for the run --config and key=value overrides describe.")
    info.add_argument("model", help="checkpoint directory or hub id")
    info.add_argument("overrides", nargs="*", help="run-config overrides (key.sub=value), e.g. "
                      "training.per_device_train_batch_size=4 data.max_seq_length=2048")
    info.add_argument("--config", default=None, help="a run config (YAML) whose lora / data / training sections "
                      "the estimate uses (its quantization too)")
    info.add_argument("--revision", default=None, help="hub revision (with a hub id)")
    info.add_argument("--quantize", action="store_true",
                      help="stream and quantize every tensor for real (default: shapes only)")
    _add_quant_args(info)
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="complete prompts with a (quantized) model",
                         description="Load a checkpoint (NF4 by default), complete each --prompt, print the text.")
    gen.add_argument("model", help="checkpoint directory or hub id")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument("--adapter", default=None, help="a LoRA adapter directory (PEFT format) to attach")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                     help="activations and dense weights (and the quantized matmuls' compute dtype)")
    _add_quant_args(gen, allow_none=True)
    gen.add_argument("--revision", default=None, help="hub revision (with a hub id)")
    gen.set_defaults(func=cmd_generate)

    tr = sub.add_parser("train", help="QLoRA fine-tuning from a run config",
                        description="Fine-tune with QLoRA as CONFIG (YAML) describes, with key.sub=value overrides "
                                    "(model=X is short for model.name_or_path=X). Checkpoints go to "
                                    "<output_dir>/checkpoints/, the adapter (PEFT format) to <output_dir>/adapter/, "
                                    "metrics to <output_dir>/metrics.jsonl; an output_dir with this run's "
                                    "checkpoints resumes.")
    tr.add_argument("config", nargs="?", default=None, help="a YAML run config (configs/*.yaml); omit for defaults")
    tr.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    tr.set_defaults(func=cmd_train)

    la = sub.add_parser("launch", help="run a command in several local processes that train as one (jax.distributed)",
                        description="Start --num-processes local processes of `qlora-jax COMMAND ...` as one JAX "
                                    "process group (coordinator on 127.0.0.1; each process gets JAX_NUM_PROCESSES, "
                                    "JAX_PROCESS_ID and JAX_COORDINATOR_ADDRESS), stream their output with a [rank] "
                                    "prefix, and if one fails stop the others and exit non-zero naming it. Across "
                                    "hosts, set those three variables on each host instead (docs/multihost.md).",
                        usage="qlora-jax launch --num-processes N [--cpu-devices-per-process K] [--timeout S] "
                              "-- train CONFIG [key=value ...]")
    la.add_argument("--num-processes", type=int, required=True, help="processes to start on this machine")
    la.add_argument("--cpu-devices-per-process", type=int, default=0,
                    help="K > 0: force K CPU devices per process and use gloo collectives (tests, CPU-only hosts); "
                         "0: each process uses the machine's devices")
    la.add_argument("--timeout", type=int, default=300,
                    help="seconds a process waits for the coordinator or a silent peer before failing (default 300)")
    la.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the qlora-jax subcommand, e.g. train run.yaml")
    la.set_defaults(func=cmd_launch)

    mg = sub.add_parser("merge", help="fold an adapter into its base and write a Hugging Face checkpoint",
                        description="Load MODEL as it was trained (NF4 by default), attach --adapter, merge it onto "
                                    "the dequantized base (never re-quantizing) and write --output in --dtype.")
    mg.add_argument("model", help="the base checkpoint directory or hub id")
    mg.add_argument("--adapter", required=True, help="the LoRA adapter directory (PEFT format)")
    mg.add_argument("--output", required=True, help="where to write the merged checkpoint")
    mg.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    _add_quant_args(mg, allow_none=True)  # as the base was quantized during training
    mg.add_argument("--revision", default=None)
    mg.set_defaults(func=cmd_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers advises installing torch on import; configs and tokenizers need no torch
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from .distributed import DistributedError

    try:
        return args.func(args)
    except (ValueError, DistributedError) as e:
        print(f"qlora-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
