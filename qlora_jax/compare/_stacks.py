"""The comparison's three stacks, each run in its own process (``python -m qlora_jax.compare._worker
STACK CONFIG_JSON CHECKPOINT WORKDIR RESULT_JSON``) so that its peak memory is its own.

Every stack does the same job (``CompareConfig``): load + quantize the checkpoint to NF4 with
double quantization, train LoRA (r, alpha, dropout 0, all linear layers) with AdamW for ``steps``
steps on the same batches, then generate greedily from the same prompt. The reference runs first:
it leaves bitsandbytes' quantized base (``WORKDIR/bnb_base``, transformers' own 4-bit format) and
PEFT's initial adapters (``WORKDIR/initial_adapter``) for the others, so that qlora_jax trains on
the very codes bitsandbytes made, from the very adapters PEFT drew.

A stack's result holds the figures of comparison.json (``FIGURES``) and, for each figure it could
not produce, the reason under ``errors``.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from ..bench import PeakAnonMemory
from ._presets import CompareConfig, make_batches, make_prompt

FIGURES = ("load_seconds", "load_peak_rss_bytes", "train_tokens_per_s", "train_peak_rss_bytes", "losses",
           "gen_tokens_per_s", "gen_tokens")
# which figures each phase produces (a failed phase leaves them null, with its reason)
PHASE_FIGURES = {"load": ("load_seconds", "load_peak_rss_bytes"),
                 "train": ("train_tokens_per_s", "train_peak_rss_bytes", "losses"),
                 "generate": ("gen_tokens_per_s", "gen_tokens")}
# every decoder linear, and the submodule (HF name) that holds it
LINEAR_GROUPS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LORA_TARGETS = tuple(LINEAR_GROUPS)


def empty_result() -> dict:
    return {**{k: None for k in FIGURES}, "errors": {}, "notes": []}


class _Phase:
    """``with _Phase(result, "train"):`` records an exception as the phase's reason (its figures stay
    null) instead of ending the stack; ``ok`` says whether the phase completed."""

    def __init__(self, result: dict, name: str):
        self.result, self.name, self.ok = result, name, False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None:
            self.ok = True
            return False
        if not isinstance(error, Exception):
            return False
        message = str(error).strip().splitlines()
        self.result["errors"][self.name] = f"{kind.__name__}: {message[0] if message else ''}"[:400]
        self.result.setdefault("tracebacks", {})[self.name] = "".join(traceback.format_exception(error))[-4000:]
        for key in PHASE_FIGURES.get(self.name, ()):
            self.result[key] = None
        return True


def train_figures(result: dict, step_seconds: list[float], tokens_per_step: int) -> None:
    """tokens/s from the median step after the first two; the first two steps' excess over the
    median is compile and warm-up time, reported apart."""
    median = statistics.median(step_seconds[2:])
    result.update(step_seconds=step_seconds, train_tokens_per_s=tokens_per_step / median,
                  train_warmup_seconds=max(0.0, sum(step_seconds[:2]) - 2 * median))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed_load(result: dict, load):
    """``load()``'s result; its wall seconds and the peak anonymous RSS meanwhile as the load figures."""
    with PeakAnonMemory() as mem:
        model, result["load_seconds"] = _timed(load)
    result["load_peak_rss_bytes"] = mem.peak
    return model


def train_loop(result: dict, config: CompareConfig, vocab: int, one_step) -> None:
    """``one_step(rows)`` on each of the job's batches (int64 [batch, seq]), returning the step's loss
    as a Python float (so the step has finished); losses, step times, tokens/s and peak RSS."""
    losses, seconds = [], []
    with PeakAnonMemory() as mem:
        for rows in make_batches(config, vocab):
            t0 = time.perf_counter()
            losses.append(one_step(rows))
            seconds.append(time.perf_counter() - t0)
    result.update(losses=losses, train_peak_rss_bytes=mem.peak)
    train_figures(result, seconds, config.batch * config.seq)


GEN_REPEATS = 3


def _timed_generation(gen):
    """(output, median seconds of ``GEN_REPEATS`` timed runs after a first one, that first run's
    excess over the median: compile and warm-up)."""
    _, first = _timed(gen)
    runs = [_timed(gen) for _ in range(GEN_REPEATS)]
    secs = statistics.median(t for _, t in runs)
    return runs[-1][0], secs, max(0.0, first - secs)


def _import_config_classes() -> None:
    """Import transformers' config machinery before any timing, as the reference imports its
    libraries before its clock starts: no stack's load time counts library imports. (With torch
    installed, transformers' config modules import it: about three seconds on these cores.)"""
    import transformers  # noqa: F401
    from transformers import AutoConfig  # noqa: F401
    from transformers.models.llama import configuration_llama  # noqa: F401


def _jax_result() -> dict:
    """A JAX stack's result before its clock starts: the device it runs on and its baseline RSS."""
    import jax

    _import_config_classes()
    result = empty_result()
    result["device"] = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    result["baseline_rss_bytes"] = PeakAnonMemory.current()
    return result


def _peft_adapter(work: Path) -> dict[str, np.ndarray] | None:
    from safetensors.numpy import load_file

    path = work / "initial_adapter" / "adapter_model.safetensors"
    return load_file(path) if path.exists() else None


# --------------------------------------------------------------------------------------------
# PyTorch: transformers + bitsandbytes + PEFT


def run_reference(config: CompareConfig, ckpt: Path, work: Path) -> dict:
    import peft
    import torch
    import transformers

    result = empty_result()
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    result["device"] = f"cpu ({torch.get_num_threads()} threads)"
    result["torch_threads"] = torch.get_num_threads()
    result["baseline_rss_bytes"] = PeakAnonMemory.current()
    with _Phase(result, "load"):
        if config.load_in_8bit:
            bnb = transformers.BitsAndBytesConfig(load_in_8bit=True)
            result["notes"].append("8-bit base: bitsandbytes on CPU trains with MatMul8bitFp (dequantize + linear) "
                                   "and generates with MatMul8bitLt (int8 activations, outlier decomposition); "
                                   "qlora_jax runs MatMul8bitLt's semantics for both (docs/decisions.md)")
        else:
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = timed_load(result, lambda: transformers.AutoModelForCausalLM.from_pretrained(
                ckpt, quantization_config=bnb, dtype=dtype, device_map="cpu"))
        result["notes"] += sorted({f"bitsandbytes/transformers warned: {w.message}" for w in caught
                                   if "bitsandbytes" in str(w.filename) or "gemm_4bit" in str(w.message)})
    if "load" in result["errors"]:
        return result
    # bitsandbytes' quantized base, in transformers' 4-bit (8-bit) format, for qlora_jax to train on
    model.save_pretrained(work / "bnb_base")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                       target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    model.save_pretrained(work / "initial_adapter")
    vocab = model.config.vocab_size
    with _Phase(result, "train"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        model.train()

        def one_step(rows):
            ids = torch.from_numpy(rows)
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        train_loop(result, config, vocab, one_step)
    # which 4-bit paths ran (before eval(): bitsandbytes repacks CPU weights for inference there)
    paths = {"train": _bitsandbytes_ops(lambda: _reference_train_pass(model, config, vocab))}
    with _Phase(result, "generate"):
        model.eval()
        model.base_model.model.generation_config.eos_token_id = None  # always max_new_tokens tokens
        prompt = torch.from_numpy(make_prompt(config, vocab))

        def gen():
            with torch.no_grad():
                return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=config.max_new_tokens, do_sample=False)

        out, secs, warm = _timed_generation(gen)
        result.update(gen_tokens=out[0, prompt.shape[1]:].tolist(), gen_tokens_per_s=config.max_new_tokens / secs,
                      gen_warmup_seconds=warm)
    paths["generate"] = _bitsandbytes_ops(lambda: _reference_generate_pass(model, config, vocab))
    result["paths"] = paths
    return result


def _bitsandbytes_ops(fn) -> list[str] | str:
    """The bitsandbytes ops ``fn`` runs (torch's profiler): which 4-bit paths the reference takes on
    this machine. Run on an extra, untimed pass."""
    import torch

    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    except Exception as e:  # noqa: BLE001  (the phase's own failure is reported with its figures)
        return f"failed: {type(e).__name__}: {str(e)[:200]}"
    return sorted({e.key for e in prof.key_averages() if "bitsandbytes" in e.key})


def _reference_train_pass(model, config: CompareConfig, vocab: int) -> None:
    import torch

    ids = torch.from_numpy(make_batches(config, vocab)[0][:1, :64])
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _reference_generate_pass(model, config: CompareConfig, vocab: int) -> None:
    import torch

    ids = torch.from_numpy(make_prompt(config, vocab))
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------------------------
# qlora_jax


# Unrolled layers: scanned, decoding slices every layer's weights out of their stacks for each token
# (1b, Zen 4: 16.4 against 28.2 tokens/s). Training is about a tie since the scan's residuals are
# saved as uint16 (b080aeb; before, the scanned step ran ~20% slower): 1b 105 against 101 tokens/s
# at 0.91x the unrolled train RSS; small 0.63 against 0.62 s a step. Compile time is reported apart.
SCAN_LAYERS = False


def run_qlora_jax(config: CompareConfig, ckpt: Path, work: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import qlora_jax
    from qlora_jax.models._checkpoint import release_freed_memory
    from qlora_jax.kernels import cpu_nf4
    from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model, update_model

    from ._exact import compare_with_bnb

    result = _jax_result()
    dtype = jnp.dtype(config.dtype)
    cpu_kernel = "built" if cpu_nf4.available() else f"not available: {cpu_nf4.unavailable_reason()}"
    gemm = (f"the native GEMM kernel ({cpu_nf4.gemm_isa()}) above and for dx" if cpu_nf4.gemm_available() else
            "XLA's dequantize + dot above (no GEMM kernel here: neither AVX-512 BF16 nor AVX2)")
    attention = ("the native attention kernels (AVX-512 BF16)" if cpu_nf4.attention_available() and
                 dtype == jnp.bfloat16 else "XLA's attention")
    if cpu_nf4.gemm_isa() == "amx_bf16" and dtype == jnp.bfloat16:
        attention += " and the LM head's two products on AMX (cpu_dense_gemm)"
    elif cpu_nf4.gemm_isa() in ("avx512_bf16", "avx2") and dtype == jnp.bfloat16:
        isa = {"avx512_bf16": "AVX-512 BF16", "avx2": "AVX2"}[cpu_nf4.gemm_isa()]
        attention += f" and the LM head's logits on the native kernel ({isa}, cpu_dense_gemm)"
    from_m = cpu_nf4.gemm_from_m()
    gemv_rows = f"{cpu_nf4.MAX_M} rows" + (f" (bfloat16: {from_m - 1})" if from_m else "")
    result["configuration"] = (f"from_pretrained(scan_layers={SCAN_LAYERS}), kernel 'auto' (on CPU: the native "
                               f"GEMV kernel, {cpu_kernel}, for up to {gemv_rows}; {gemm}; in training "
                               f"{attention}), optim 'adamw' (on device), one jitted train step")
    if config.load_in_8bit:
        quant = qlora_jax.QuantConfig(load_in_8bit=True)
        result["configuration"] = ("from_pretrained(scan_layers=False), LLM.int8() base (load_in_8bit, threshold "
                                   "6.0: XLA's int8 x int8 -> int32 dot with outlier columns by mask), optim 'adamw' "
                                   "(on device), one jitted train step")
    else:
        quant = qlora_jax.QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=config.dtype)
    with _Phase(result, "load"):
        def load():
            m = qlora_jax.from_pretrained(ckpt, quantization=quant, dtype=dtype, scan_layers=SCAN_LAYERS,
                                          gradient_checkpointing=config.gradient_checkpointing)
            jax.block_until_ready(nnx.state(m))
            return m

        model = timed_load(result, load)
    if "load" in result["errors"]:
        return result
    bnb_base = work / "bnb_base"
    with _Phase(result, "bit_exact"):
        if not bnb_base.exists():
            raise FileNotFoundError("no bitsandbytes state to compare with (the reference stack did not run)")
        reference = work / "reference.json"  # the reference's own result, written before this stack runs
        threads = json.loads(reference.read_text()).get("torch_threads") if reference.exists() else None
        result["bit_exact"] = compare_with_bnb(model, ckpt, bnb_base, quant, torch_threads=threads)
    del model
    gc.collect()
    release_freed_memory()

    # Training starts from bitsandbytes' own codes (its saved 4-bit base) and PEFT's initial adapters.
    if bnb_base.exists():
        model = qlora_jax.from_pretrained(bnb_base, dtype=dtype, scan_layers=SCAN_LAYERS,
                                          gradient_checkpointing=config.gradient_checkpointing)
        result["train_base"] = ("bitsandbytes' quantized state (its saved " + ("8-bit" if config.load_in_8bit else
                                "4-bit") + " checkpoint, loaded without requantizing)")
    else:
        model = qlora_jax.from_pretrained(ckpt, quantization=quant, dtype=dtype, scan_layers=SCAN_LAYERS,
                                          gradient_checkpointing=config.gradient_checkpointing)
        result["train_base"] = "qlora_jax's own quantization (the reference stack did not run)"
    if (work / "initial_adapter").exists():
        qlora_jax.load_adapter(model, work / "initial_adapter")
        result["initial_adapter"] = "PEFT's initialisation"
    else:
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                         target_modules=list(LORA_TARGETS)))
        result["initial_adapter"] = "qlora_jax's own initialisation (the reference stack did not run)"
    vocab = model.config.vocab_size
    with _Phase(result, "train"):
        parts = split_model(model)
        tx = make_optimizer(config.learning_rate, num_training_steps=config.steps, lr_scheduler_type="constant",
                            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                            max_grad_norm=None, optim="adamw")
        state = [parts.trainable, parts.rngs, init_opt_state(tx, parts.trainable)]
        step = make_train_step(parts.graphdef, tx)

        def one_step(rows):
            ids = jnp.asarray(rows[None], jnp.int32)  # one micro-batch
            batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
            trainable, rngs, opt_state, metrics = step(state[0], state[1], parts.frozen, state[2], batch)
            state[:] = [trainable, rngs, opt_state]
            return float(metrics["loss"])

        train_loop(result, config, vocab, one_step)
        update_model(model, state[0], state[1])
        state.clear()  # the optimizer state goes before generation
    with _Phase(result, "generate"):
        _generate_jax(result, model, config, vocab)
    return result


def _generate_jax(result: dict, model, config: CompareConfig, vocab: int) -> None:
    import jax

    import qlora_jax

    prompt = make_prompt(config, vocab)

    def gen():
        return jax.block_until_ready(qlora_jax.generate(model, prompt, max_new_tokens=config.max_new_tokens))

    out, secs, warm = _timed_generation(gen)
    result.update(gen_tokens=np.asarray(out)[0, prompt.shape[1]:].tolist(),
                  gen_tokens_per_s=config.max_new_tokens / secs, gen_warmup_seconds=warm)


# --------------------------------------------------------------------------------------------
# Qwix: Google's JAX quantization library, its NF4 LoRA on our dense, unrolled model


def qwix_rules(ckpt: Path, config: CompareConfig) -> list:
    """Qwix's LoRA rules: NF4 tiles of 64 input features; where a linear's input features are not a
    multiple of 64 (down_proj of the small preset: 1376), Qwix cannot tile them by 64 and the rule
    for those modules takes the largest power of two that divides them (1376: 32). With an 8-bit
    base: Qwix's int8, one scale per output feature (no tiles), as LLM.int8()'s row scales."""
    import qwix
    from transformers import AutoConfig

    if config.load_in_8bit:
        return [qwix.LoraRule(module_path=r".*/(" + "|".join(f"{g}/{n}" for n, g in LINEAR_GROUPS.items()) + ")",
                              weight_qtype="int8", rank=config.r, alpha=config.lora_alpha)]
    hf = AutoConfig.from_pretrained(ckpt)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    in_features = {name: hf.hidden_size for name in LINEAR_GROUPS}
    in_features.update(o_proj=hf.num_attention_heads * head_dim, down_proj=hf.intermediate_size)
    by_tile: dict[int, list[str]] = {}
    for name, k in in_features.items():
        by_tile.setdefault(min(64, k & -k), []).append(name)
    return [qwix.LoraRule(module_path=r".*/(" + "|".join(f"{LINEAR_GROUPS[n]}/{n}" for n in names) + ")",
                          weight_qtype="nf4", tile_size=tile, rank=config.r, alpha=config.lora_alpha)
            for tile, names in sorted(by_tile.items(), reverse=True)]


def run_qwix(config: CompareConfig, ckpt: Path, work: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    import qwix
    from flax import nnx

    import qlora_jax
    from qlora_jax.train import causal_lm_loss_sum

    result = _jax_result()
    dtype = jnp.dtype(config.dtype)
    rules = qwix_rules(ckpt, config)
    qtype = "int8" if config.load_in_8bit else "nf4"
    result["configuration"] = (f"qwix {qwix.__version__}: LoraProvider of LoraRule(weight_qtype='{qtype}', "
                               f"rank={config.r}, alpha={config.lora_alpha}) for "
                               + "; ".join(f"module_path {r.module_path!r} with tile_size {r.tile_size}" for r in rules)
                               + ", applied with "
                               "apply_lora_to_model to qlora_jax's dense model (scan_layers=False), intercepting its "
                               + ("forward; int8 codes with a scale per output feature" if config.load_in_8bit else
                                  "forward; uint4 codes with a scale per tile, no double quantization")
                               + "; jitted AdamW step "
                               "over the nnx.LoRAParam leaves")
    with _Phase(result, "load"):
        def load():
            m = qlora_jax.from_pretrained(ckpt, dtype=dtype, scan_layers=False,
                                          gradient_checkpointing=config.gradient_checkpointing)
            ids = jnp.zeros((1, 8), jnp.int32)
            m = qwix.apply_lora_to_model(m, qwix.LoraProvider(rules), ids, jnp.arange(8)[None], jnp.ones_like(ids),
                                         methods=("forward",), rngs=nnx.Rngs(config.seed))
            jax.block_until_ready(nnx.state(m))
            return m

        model = timed_load(result, load)
    if "load" in result["errors"]:
        return result
    stored = _peft_adapter(work)
    result["initial_adapter"] = "PEFT's initialisation" if stored is not None else "Qwix's own initialisation"
    if stored is not None:
        _load_peft_into_qwix(model, stored)
    vocab = model.config.vocab_size
    with _Phase(result, "train"):
        graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
        tx = optax.adamw(config.learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
        opt_state = tx.init(lora)

        def step(lora, opt_state, rest, ids):  # the frozen base is an argument, not a baked-in constant
            def loss_fn(lora):
                logits = nnx.merge(graphdef, lora, rest)(ids, jnp.ones_like(ids))
                total, count = causal_lm_loss_sum(logits, ids)
                return total / count

            loss, grads = jax.value_and_grad(loss_fn)(lora)
            updates, opt_state = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state, loss

        step = jax.jit(step, donate_argnums=(0, 1))
        state = [lora, opt_state]

        def one_step(rows):
            new_lora, new_opt, loss = step(state[0], state[1], rest, jnp.asarray(rows, jnp.int32))
            state[:] = [new_lora, new_opt]
            return float(loss)

        train_loop(result, config, vocab, one_step)
        nnx.update(model, state[0])
        state.clear()  # the optimizer state goes before generation
        del lora, opt_state
    with _Phase(result, "generate"):
        _generate_jax(result, model, config, vocab)
    return result


def _load_peft_into_qwix(model, stored: dict[str, np.ndarray]) -> None:
    """PEFT's lora_A [r, in] and lora_B [out, r] of each layer's linear into Qwix's ``weight_lora_a``
    [in, r] and ``weight_lora_b`` [r, out] (its LoRA of ``x @ W^T`` contracts W's input axis)."""
    import jax.numpy as jnp

    for i, layer in enumerate(model.layers):
        for name, group in LINEAR_GROUPS.items():
            module = getattr(getattr(layer, group), name)
            prefix = f"base_model.model.model.layers.{i}.{group}.{name}"
            for part, attr in (("lora_A", "weight_lora_a"), ("lora_B", "weight_lora_b")):
                var = getattr(module, attr)
                value = stored[f"{prefix}.{part}.weight"].T
                if value.shape != var.get_value().shape:
                    raise ValueError(f"{prefix}.{part}: PEFT's {value.shape} does not fit Qwix's "
                                     f"{var.get_value().shape}")
                var.set_value(jnp.asarray(value, var.get_value().dtype))


RUNNERS = {"reference": run_reference, "qlora_jax": run_qlora_jax, "qwix": run_qwix}


def main(argv: list[str]) -> None:
    stack, config, ckpt, work, out = argv
    config = CompareConfig.from_json(config)
    result = RUNNERS[stack](config, Path(ckpt), Path(work))
    Path(out).write_text(json.dumps(result))

