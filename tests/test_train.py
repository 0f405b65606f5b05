"""The QLoRA train step against transformers + PEFT, accumulation, schedules, clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers
from flax import nnx

import qlora_jax
from qlora_jax.models import write_tiny_checkpoint

from bnb_ref import hf_model_on_our_base
from qlora_jax.train import (IGNORE_INDEX, make_optimizer, make_schedule, make_train_step, merge_model,
                             split_model)

VOCAB = 320


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("train") / "base", "llama", num_hidden_layers=2)


def _batches(n, batch=4, seq=16, seed=0):
    """Random token batches with right padding (labels -100 there), unequal lengths per row."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, VOCAB, (batch, seq))
        lengths = rng.integers(seq // 2, seq + 1, batch)
        mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int64)
        ids = np.where(mask, ids, 3)
        labels = np.where(mask, ids, IGNORE_INDEX)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _max_rel_logits(a, b):
    ids = jnp.asarray([[5, 6, 7, 8]])
    x, y = np.asarray(a(ids)), np.asarray(b(ids))
    return float(np.abs(x - y).max() / np.abs(y).max())


def _stack(batches):
    return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


def test_twenty_steps_match_peft_training(base, tmp_path):
    """Same NF4 base (PEFT gets our dequantized weights), same initial A and B, same batches, AdamW
    with every knob pinned: per-step losses and the final adapters agree to 1e-4 (fp32)."""
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    config = qlora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    qlora_jax.apply_lora(model, config, seed=0)
    qlora_jax.save_adapter(model, tmp_path / "init")

    pm = peft.PeftModel.from_pretrained(hf_model_on_our_base(model, base), tmp_path / "init", is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    split = split_model(model)
    tx = make_optimizer(1e-3, num_training_steps=20, lr_scheduler_type="constant", max_grad_norm=None)
    opt_state = tx.init(split.trainable)
    step = make_train_step(split.graphdef, tx)
    trainable, rngs = split.trainable, split.rngs
    ours_losses, theirs_losses = [], []
    for b in _batches(2) * 10:  # two batches seen ten times each: the loss must fall
        trainable, rngs, opt_state, metrics = step(trainable, rngs, split.frozen, opt_state, _stack([b]))
        ours_losses.append(float(metrics["loss"]))
        out = pm(input_ids=torch.tensor(b["input_ids"]), attention_mask=torch.tensor(b["attention_mask"]),
                 labels=torch.tensor(b["labels"]))
        theirs_losses.append(out.loss.item())
        torch_opt.zero_grad()
        out.loss.backward()
        torch_opt.step()
    np.testing.assert_allclose(ours_losses, theirs_losses, rtol=1e-4)
    assert ours_losses[-1] < ours_losses[0] - 0.1  # it learns
    trained = qlora_jax.train.update_model(model, trainable, rngs)
    assert _max_rel_logits(trained, merge_model(split._replace(trainable=trainable, rngs=rngs))) == 0
    qlora_jax.save_adapter(trained, tmp_path / "ours")
    from safetensors.numpy import load_file

    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    pm.save_pretrained(tmp_path / "theirs")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        scale = np.abs(theirs[k]).max()
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=1e-4 * scale, err_msg=k)


def test_accumulation_equals_one_large_batch(base):
    """k micro-batches of unequal token counts = one k-times-larger batch (normalised by the total
    number of loss tokens, not by a mean of per-micro-batch means)."""
    model = qlora_jax.from_pretrained(base)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    split = split_model(model)
    tx = optax.sgd(1.0)  # the update is the gradient itself
    step = make_train_step(split.graphdef, tx, donate=False)
    micro = _batches(4, batch=2, seed=5)
    big = {k: np.concatenate([m[k] for m in micro]) for k in micro[0]}
    t_acc, _, _, m_acc = step(split.trainable, split.rngs, split.frozen, tx.init(split.trainable), _stack(micro))
    t_big, _, _, m_big = step(split.trainable, split.rngs, split.frozen, tx.init(split.trainable), _stack([big]))
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(t_acc), jax.tree.leaves(t_big)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * float(np.abs(np.asarray(b)).max()))
    # the per-micro-batch mean would differ: the micro-batches hold different numbers of tokens
    counts = [int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro]
    assert len(set(counts)) > 1


def test_frozen_base_gets_no_gradient_buffer(base):
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig())
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear"))
    split = split_model(model)
    leaves = jax.tree.leaves(split.trainable)
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    frozen_leaves = jax.tree.leaves(split.frozen)
    assert any(x.dtype == jnp.uint8 for x in frozen_leaves)  # NF4 codes stay in the frozen part
    assert sum(x.size for x in leaves) == qlora_jax.lora.count_parameters(model)[0]


def test_step_gives_the_compilers_heap_back_after_compiling(base, monkeypatch):
    """The call that compiles the step trims the host heap (once the compile is done, and again once
    that call's outputs are ready); later calls, which compile nothing, do not."""
    from qlora_jax.models import _checkpoint

    trims = []
    monkeypatch.setattr(_checkpoint, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(_checkpoint, "_LONG_COMPILE_SECONDS", 0.0)  # the tiny step compiles fast
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig())
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear"))
    parts = split_model(model)
    tx = make_optimizer(1e-3, num_training_steps=2)
    step = make_train_step(parts.graphdef, tx)
    assert hasattr(step, "lower")  # still the jitted function for AOT use
    import copy

    assert copy.copy(step).lower is not None  # a copy is built without __init__: no recursion
    batch = _stack(_batches(1))  # one micro-batch
    state = (parts.trainable, parts.rngs, qlora_jax.train.init_opt_state(tx, parts.trainable))
    trims.clear()
    t, r, o, _ = step(state[0], state[1], parts.frozen, state[2], batch)
    assert len(trims) >= 2
    trims.clear()
    t, r, o, metrics = step(t, r, parts.frozen, o, batch)
    assert trims == [] and np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_schedules_match_transformers(kind):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2e-4)
    sched = transformers.get_scheduler(kind, opt, num_warmup_steps=math.ceil(0.1 * 50), num_training_steps=50)
    theirs = []
    for _ in range(50):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = make_schedule(2e-4, kind, num_training_steps=50, warmup_ratio=0.1)
    # fp32 here, doubles there: compare to a millionth of the peak rate
    np.testing.assert_allclose([float(ours(i)) for i in range(50)], theirs, rtol=1e-6, atol=1e-6 * 2e-4)


def test_clipping_matches_torch():
    g = {"a": jnp.arange(12.0).reshape(3, 4), "b": -jnp.ones(5) * 3}
    t = [torch.tensor(np.asarray(v)).requires_grad_() for v in g.values()]
    for tt, v in zip(t, g.values()):
        tt.grad = torch.tensor(np.asarray(v))
    torch.nn.utils.clip_grad_norm_(t, 0.3)
    tx = make_optimizer(1.0, num_training_steps=1, max_grad_norm=0.3)
    clipped, _ = tx.update(g, tx.init(g), g)
    clip_only = qlora_jax.train.clip_by_global_norm_torch(0.3)
    ours, _ = clip_only.update(g, clip_only.init(g))
    for o, tt in zip(ours.values(), t):
        np.testing.assert_allclose(np.asarray(o), tt.grad.numpy(), rtol=1e-6)
    assert clipped is not None


def test_bf16_training_keeps_fp32_master_adapters(base):
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(), dtype=jnp.bfloat16)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear"))
    split = split_model(model)
    tx = make_optimizer(2e-3, num_training_steps=10, max_grad_norm=0.3)
    step = make_train_step(split.graphdef, tx)
    trainable, rngs, opt_state = split.trainable, split.rngs, tx.init(split.trainable)
    losses = []
    batch = _stack(_batches(1, seed=9))
    for _ in range(10):  # overfit one batch
        trainable, rngs, opt_state, metrics = step(trainable, rngs, split.frozen, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainable))
    assert losses[-1] < losses[0] and np.isfinite(losses).all()


def test_dropout_is_seeded_and_active_in_training(base):
    model = qlora_jax.from_pretrained(base)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                                                     init_lora_weights=False), seed=1)
    split = split_model(model)
    tx = optax.sgd(0.0)
    step = make_train_step(split.graphdef, tx, donate=False)
    batch = _stack(_batches(1))
    _, rngs1, _, m1 = step(split.trainable, split.rngs, split.frozen, tx.init(split.trainable), batch)
    _, _, _, m2 = step(split.trainable, rngs1, split.frozen, tx.init(split.trainable), batch)
    _, _, _, m1_again = step(split.trainable, split.rngs, split.frozen, tx.init(split.trainable), batch)
    assert float(m1["loss"]) != float(m2["loss"])  # the RNG state advances
    assert float(m1["loss"]) == float(m1_again["loss"])  # and is reproducible


def test_fp16_dynamic_loss_scaling_skips_overflow_and_recovers(base):
    """As torch.amp.GradScaler: an overflowing step leaves adapters and optimizer state untouched and
    halves the scale; finite steps train; growth_interval finite steps double it."""
    from qlora_jax.train import init_opt_state

    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float16"),
                                      dtype=jnp.float16)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    split = split_model(model)
    tx = make_optimizer(1e-3, num_training_steps=40, max_grad_norm=1.0)
    step = make_train_step(split.graphdef, tx, donate=False, growth_interval=3)
    opt_state = init_opt_state(tx, split.trainable, loss_scaling=True, init_scale=2.0 ** 40)  # overflows in fp16
    trainable, rngs = split.trainable, split.rngs
    batch = _stack(_batches(1, seed=2))
    scales, skipped, losses = [], [], []
    for _ in range(40):
        new, rngs, opt_state, m = step(trainable, rngs, split.frozen, opt_state, batch)
        scales.append(float(m["loss_scale"]))
        skipped.append(bool(m["skipped"]))
        if skipped[-1]:
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(trainable)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            losses.append(float(m["loss"]))
        trainable = new
    assert skipped[0] and scales[1] == scales[0] / 2  # overflow: skipped, scale halved
    assert not all(skipped) and np.isfinite(losses).all() and losses[-1] < losses[0]
    first_ok = skipped.index(False)
    assert not any(skipped[first_ok:first_ok + 3])
    assert scales[first_ok + 3] == 2 * scales[first_ok]  # three finite steps in a row: doubled


def test_explicit_shardings(base):
    """The step takes explicit shardings (here one device, replicated) and keeps its results there."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig())
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear"))
    split = split_model(model)
    tx = make_optimizer(1e-3, num_training_steps=2)
    opt_state = tx.init(split.trainable)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rep = NamedSharding(mesh, PartitionSpec())
    place = lambda tree: jax.tree.map(lambda _: rep, tree)  # noqa: E731
    batch = _stack(_batches(1))
    shardings = (place(split.trainable), place(split.rngs), place(split.frozen), place(opt_state), place(batch))
    step = make_train_step(split.graphdef, tx, in_shardings=shardings,
                           out_shardings=(shardings[0], shardings[1], shardings[3], None))
    trainable, _, _, metrics = step(split.trainable, split.rngs, split.frozen, opt_state, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert all(x.sharding == rep for x in jax.tree.leaves(trainable))


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_packed_examples_never_see_each_other(tmp_path, model_type):
    """Examples packed into one row (segment ids in the attention mask, as ``qlora_jax.data.pack``
    makes them) get the logits, loss and adapter gradient they get alone: no attention across a
    boundary, positions restarting per example (trl#1230's contamination). Mistral: with a sliding
    window shorter than the row."""
    from qlora_jax.data import Tokenized, iterate_batches, pack
    from qlora_jax.lora import LoraParam
    from qlora_jax.train import causal_lm_loss_sum

    extra = {"sliding_window": 12} if model_type == "mistral" else {}
    path = write_tiny_checkpoint(tmp_path / "base", model_type, num_hidden_layers=2, **extra)
    model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                         seed=0)
    rng = np.random.default_rng(0)
    lengths = [23, 17, 9, 14, 5]
    ids = [rng.integers(3, VOCAB, n).astype(np.int32) for n in lengths]
    labels = [np.where(rng.random(n) < 0.3, IGNORE_INDEX, x).astype(np.int32) for n, x in zip(lengths, ids)]
    packed = pack(Tokenized(ids, labels, 0), 64)
    assert len(packed.input_ids) == 2  # 23+17+14+9 in one row, 5 in another: really packed
    _, batch = next(iterate_batches(packed, batch_size=2, max_seq_length=64, pad_token_id=3, shuffle=False))
    batch = {k: jnp.asarray(v[0]) for k, v in batch.items()}

    @nnx.jit
    def loss_and_grad(m, b):
        def f(m):
            logits = m(b["input_ids"], b["attention_mask"])
            return causal_lm_loss_sum(logits, b["labels"])[0], logits
        (loss, logits), grad = nnx.value_and_grad(f, argnums=nnx.DiffState(0, LoraParam), has_aux=True)(m)
        return loss, logits, grad

    loss, logits, grad = loss_and_grad(model, batch)
    total, grads = 0.0, None
    for row, seg in enumerate(packed.segment_ids):
        for k in range(1, int(seg.max()) + 1):
            where = np.flatnonzero(seg == k)
            alone = {"input_ids": batch["input_ids"][row:row + 1, where],
                     "attention_mask": jnp.ones((1, len(where)), jnp.int32),
                     "labels": batch["labels"][row:row + 1, where]}
            l1, lg1, g1 = loss_and_grad(model, alone)
            np.testing.assert_allclose(np.asarray(logits[row, where]), np.asarray(lg1[0]), rtol=1e-5, atol=1e-5)
            total += float(l1)
            grads = g1 if grads is None else jax.tree.map(jnp.add, grads, g1)
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grads)):
        # fp32 sums in another order (one batch vs five): a few ulps of the tensor's scale apart
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
