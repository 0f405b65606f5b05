"""Multi-device training on 8 forced CPU devices (in a subprocess: the device count is fixed when
JAX starts): data parallelism equals the single-device run up to reduction order."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from qlora_jax.sharding import mesh_shape

SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import qlora_jax
    from qlora_jax.models import write_tiny_llama
    from qlora_jax.sharding import batch_sharding, make_mesh, place, replicated
    from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model

    assert jax.device_count() == 8
    LR = 1e-2
    path = write_tiny_llama(sys.argv[1] + "/tiny")
    out = {}
    for name in ("single", "data8"):
        model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(compute_dtype="float32"),
                                          gradient_checkpointing=True)
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
                             seed=0)
        parts = split_model(model)
        if sys.argv[2] == "sgd":  # the update is the gradient itself
            import optax
            tx = optax.sgd(1.0)
        else:
            tx = make_optimizer(LR, num_training_steps=10, weight_decay=0.01, max_grad_norm=0.3, optim=sys.argv[2])
        trainable, rngs, frozen = parts.trainable, parts.rngs, parts.frozen
        sharding = None
        if name == "data8":
            mesh = make_mesh(data=-1)
            sharding = replicated(mesh)
            trainable, rngs, frozen = (place(t, sharding) for t in (trainable, rngs, frozen))
        opt_state = init_opt_state(tx, trainable, sharding=sharding)
        step = make_train_step(parts.graphdef, tx, opt_state=opt_state)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(10):
            ids = rng.integers(3, 250, (2, 8, 32)).astype(np.int32)
            batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
            batch = {k: jax.device_put(v, batch_sharding(mesh)) if name == "data8" else jnp.asarray(v)
                     for k, v in batch.items()}
            trainable, rngs, opt_state, m = step(trainable, rngs, frozen, opt_state, batch)
            losses.append(float(m["loss"]))
        leaf = jax.tree.leaves(trainable)[0]
        out[name] = {"losses": losses, "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(trainable)],
                     "devices": len(leaf.sharding.device_set),
                     "state_kinds": sorted({x.sharding.memory_kind for x in jax.tree.leaves(opt_state)}),
                     "state_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(opt_state)})}
    json.dump(out, open(sys.argv[1] + "/out.json", "w"))
''')


@pytest.mark.parametrize("optim", ["sgd", "paged_adamw_32bit"])
def test_data_parallel_equals_single_device(tmp_path, optim):
    """data=8 against one device, 10 steps: the same losses; with SGD (update = gradient) the same
    adapters to fp32 reduction order. With (paged) Adam, whose normalised step turns a
    rounding-level change of a near-zero gradient into a change of up to one learning rate, the
    adapters agree to a small fraction of one step (seen: 1.4% of lr = 1e-2 after 10 steps)."""
    import numpy as np

    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(script), str(tmp_path), optim], check=True, env=env, timeout=900)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["data8"]["devices"] == 8 and out["single"]["devices"] == 1
    if optim.startswith("paged"):  # replicated over the mesh, in host memory between steps
        assert out["data8"]["state_kinds"] == ["pinned_host"] and out["data8"]["state_devices"] == [8]
    np.testing.assert_allclose(out["data8"]["losses"], out["single"]["losses"], rtol=1e-5)
    assert out["single"]["losses"][-1] < out["single"]["losses"][0]
    drift = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(out["data8"]["adapters"], out["single"]["adapters"]))
    scale = max(float(np.abs(np.asarray(b)).max()) for b in out["single"]["adapters"])
    print(f"[{optim}] adapters differ by {drift:.3g} (scale {scale:.3g})")
    if optim == "sgd":
        assert drift <= 1e-5 * scale  # the gradient all-reduce sums in another order
    else:
        # Adam divides by sqrt(v): where a gradient entry is near zero, a rounding-level change of it
        # moves the step by a sizeable part of lr; the SGD case above shows the gradients agree
        assert drift <= 0.05 * 1e-2


def test_mesh_shapes():
    assert mesh_shape(-1, 1, 1, num_devices=8) == (8, 1, 1)
    assert mesh_shape(2, -1, 1, num_devices=8) == (2, 4, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(-1, -1, 1, num_devices=8)
    with pytest.raises(ValueError, match="use 6 devices; there are 8"):
        mesh_shape(2, 3, 1, num_devices=8)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        mesh_shape(3, -1, 1, num_devices=8)


TRAIN = textwrap.dedent('''
    import sys
    import jax
    from qlora_jax.config import load_config
    from qlora_jax.train import train

    assert jax.device_count() == 8
    train(load_config(None, sys.argv[1:]), log=print)
''')


def test_trainer_runs_data_parallel_on_eight_devices(tmp_path):
    """``qlora-jax train`` on 8 devices (per-device batch 1, global 8) gives the losses and eval
    loss of the same run on one device with a batch of 8, and writes its adapter."""
    import numpy as np

    from qlora_jax.config import load_config
    from qlora_jax.models import write_tiny_llama
    from qlora_jax.train import train

    base = write_tiny_llama(tmp_path / "tiny")
    rows = [{"prompt": f"count {i}:", "completion": " " + " ".join(str(j) for j in range(i % 7 + 1))}
            for i in range(80)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={base}", f"data.path={tmp_path / 'd.jsonl'}", "model.dtype=float32",
              "quantization.compute_dtype=float32", "training.max_steps=4", "training.logging_steps=1",
              "training.learning_rate=1e-3", "training.disable_tqdm=true", "training.report_to=[]",
              "training.plot_loss=false", "data.validation_split=0.2", "training.eval_steps=4",
              "data.max_seq_length=64"]
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, str(script), *common, f"output_dir={tmp_path / 'eight'}",
                    "training.per_device_train_batch_size=1"], check=True, env=env, timeout=900)
    train(load_config(None, [*common, f"output_dir={tmp_path / 'one'}", "training.per_device_train_batch_size=8"]),
          log=lambda *_: None)
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    eight, one = read("eight"), read("one")
    assert [x["step"] for x in eight] == [x["step"] for x in one]
    for a, b in zip(eight, one):
        for key in ("loss", "eval_loss"):
            if key in b:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert (tmp_path / "eight" / "adapter" / "adapter_model.safetensors").exists()
