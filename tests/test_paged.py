"""Paged optimizers: state in host memory between steps, the same numbers as on the device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qlora_jax
from qlora_jax.models import write_tiny_llama
from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model
from qlora_jax.train._optim8bit import Blockwise8bit
from qlora_jax.train._paged import memory_kinds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("paged") / "tiny")


def _run(path, optim, steps, *, capture=None):
    model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(compute_dtype="float32"),
                                      gradient_checkpointing=True)
    # r=16 on the 256-wide, 4-layer tiny Llama: every stacked adapter matrix has at least 4096
    # elements, so the 8-bit optimizers keep 8-bit moments for all of them
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     init_lora_weights=False), seed=0)
    parts = split_model(model)
    tx = make_optimizer(1e-2, num_training_steps=steps, lr_scheduler_type="linear", warmup_steps=2,
                        weight_decay=0.01, max_grad_norm=0.3, optim=optim)
    opt_state = init_opt_state(tx, parts.trainable)
    step = make_train_step(parts.graphdef, tx, opt_state=opt_state)
    rng = np.random.default_rng(0)
    trainable, rngs, kinds, losses = parts.trainable, parts.rngs, set(), []
    for i in range(steps):
        ids = jnp.asarray(rng.integers(3, 250, (2, 2, 32)), jnp.int32)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": jnp.ones_like(ids)}
        if capture is not None and i == 0:
            capture.append(step.lower(trainable, rngs, parts.frozen, opt_state, batch).compile().as_text())
        trainable, rngs, opt_state, m = step(trainable, rngs, parts.frozen, opt_state, batch)
        kinds |= memory_kinds(opt_state)
        losses.append(float(m["loss"]))
    return trainable, opt_state, kinds, losses


@pytest.mark.parametrize("bits", ["32bit", "8bit"])
def test_paged_state_lives_on_the_host_and_changes_no_bit(tiny, bits):
    """50 steps of the real train step (clipping, schedule, weight decay): the paged optimizer's
    adapters equal the on-device one's bit for bit; between steps every optimizer-state array of
    the paged run is in pinned host memory (none of the on-device run's is); the compiled step
    carries host-memory annotations for it."""
    on_device = "adamw" if bits == "32bit" else "adamw_8bit"
    hlo = []
    a, state_a, kinds_a, losses = _run(tiny, on_device, 50)
    b, state_b, kinds_b, _ = _run(tiny, f"paged_adamw_{bits}", 50, capture=hlo)
    assert losses[-1] < losses[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert kinds_a == {"device"} and kinds_b == {"pinned_host"}
    assert hlo[0].count("S(5)") >= len(jax.tree.leaves(state_b))  # host memory space in the program
    eight = [x for x in jax.tree.leaves(state_b, is_leaf=lambda n: isinstance(n, Blockwise8bit))
             if isinstance(x, Blockwise8bit)]
    assert bool(eight) == (bits == "8bit")  # the 8-bit run really keeps 8-bit moments


def test_leaf_by_leaf_adamw_is_optax_adamw(tiny):
    """Our AdamW updates leaf by leaf (so paging changes no bit); against optax's AdamW over the
    whole tree the difference is XLA's: a different program rounds a few operations differently
    (about one ulp), nothing more."""
    params = {f"p{i}": jax.random.normal(jax.random.key(i), (64, 256)) for i in range(4)}
    ours = make_optimizer(1e-3, num_training_steps=50, weight_decay=0.01, max_grad_norm=None)
    theirs = optax.adamw(1e-3, weight_decay=0.01)
    sa, sb, pa, pb = ours.init(params), theirs.init(params), params, params
    for i in range(50):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(100 + i), p.shape), params)
        ua, sa = jax.jit(ours.update)(g, sa, pa)
        ub, sb = jax.jit(theirs.update)(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="optim='sgd' is not supported"):
        make_optimizer(1e-3, num_training_steps=1, optim="sgd")


def test_memory_estimate_counts_a_paged_state_as_one_chunk_on_the_device():
    from qlora_jax.models import abstract_model
    from qlora_jax.train import estimate_memory

    import qlora_jax.builtin as builtin

    model = abstract_model(builtin.resolve("builtin:tiny-llama"), quantization=qlora_jax.QuantConfig(),
                           gradient_checkpointing=True)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=16, target_modules="all-linear"))
    est = {o: estimate_memory(model, batch_size=1, seq_length=64, optimizer=o)
           for o in ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")}
    full = est["adamw"].optimizer_state
    # a quarter for the 8-bit leaves; leaves under 4096 elements keep fp32 moments
    assert full / 4 < est["adamw_8bit"].optimizer_state < full / 2
    assert est["paged_adamw_32bit"].optimizer_state < full / 4  # one of 14 leaves at a time
    assert est["paged_adamw_8bit"].optimizer_state < est["paged_adamw_32bit"].optimizer_state
    assert any("host memory between steps" in n for n in est["paged_adamw_32bit"].notes)
