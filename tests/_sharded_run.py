"""Run by test_sharding in a subprocess with 8 forced CPU devices: the same 10 QLoRA steps on one
device and on each mesh given, written to out.json (losses, adapters, placements)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import qlora_jax
from qlora_jax.models import write_tiny_llama
from qlora_jax.sharding import (abstract_lora_model, batch_sharding, make_mesh, place, replicated, shard,
                                step_memory)
from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model

LR = 1e-2


def run(path, optim, mesh_sizes):
    mesh = None if mesh_sizes is None else make_mesh(*mesh_sizes)
    model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(compute_dtype="float32"),
                                      gradient_checkpointing=True, mesh=mesh)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
                         seed=0)
    parts = split_model(model)
    if optim == "sgd":  # the update is the gradient itself
        import optax
        tx = optax.sgd(1.0)
    else:
        tx = make_optimizer(LR, num_training_steps=10, weight_decay=0.01, max_grad_norm=0.3, optim=optim)
    trainable, rngs, frozen = parts.trainable, parts.rngs, parts.frozen
    if mesh is not None:
        trainable = shard(trainable, mesh)
        rngs = place(rngs, replicated(mesh))
    opt_state = init_opt_state(tx, trainable, sharding=mesh)
    step = make_train_step(parts.graphdef, tx, opt_state=opt_state, trainable=trainable, rngs=rngs)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(10):
        ids = rng.integers(3, 250, (2, 8, 32)).astype(np.int32)
        batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
        batch = {k: jnp.asarray(v) if mesh is None else jax.device_put(v, batch_sharding(mesh))
                 for k, v in batch.items()}
        if mesh is None:
            trainable, rngs, opt_state, m = step(trainable, rngs, frozen, opt_state, batch)
        else:
            with jax.set_mesh(mesh):  # the model's constraints: FSDP gathers weights, tensor splits them
                trainable, rngs, opt_state, m = step(trainable, rngs, frozen, opt_state, batch)
        losses.append(float(m["loss"]))

    def placement(tree):  # leaf -> (devices, fraction of the leaf one device holds)
        return [[len(x.sharding.device_set), x.addressable_shards[0].data.size / max(x.size, 1)]
                for x in jax.tree.leaves(tree)]
    codes = model.layers.mlp.down_proj.base_layer.weight.get_value().codes
    device0 = jax.devices()[0]
    held = sum(s.data.nbytes for x in jax.tree.leaves(frozen) for s in x.addressable_shards if s.device == device0)
    report = None
    if mesh is not None:  # the shape-only report of the same step
        abstract = abstract_lora_model(path, qlora_jax.LoraConfig(r=8, target_modules="all-linear"),
                                       quantization=qlora_jax.QuantConfig(compute_dtype="float32"),
                                       dtype=jnp.float32)
        report = step_memory(abstract, mesh, batch_size=8 // (mesh.shape["data"] * mesh.shape["fsdp"]),
                             seq_length=32, micro_batches=2, optim=optim if optim != "sgd" else "adamw")
        report = {"base": report.base, "adapters": report.adapters, "peak": report.peak}
    return {"base_held": held, "base_total": sum(x.nbytes for x in jax.tree.leaves(frozen)), "report": report,
            "losses": losses, "adapters": [np.asarray(x).tolist() for x in jax.tree.leaves(trainable)],
            "trainable": placement(trainable), "state": placement(opt_state), "codes": placement([codes])[0],
            "state_kinds": sorted({x.sharding.memory_kind for x in jax.tree.leaves(opt_state)})}


if __name__ == "__main__":
    assert jax.device_count() == 8
    out_dir, optim, meshes = sys.argv[1], sys.argv[2], sys.argv[3:]
    path = write_tiny_llama(out_dir + "/tiny")
    out = {"single": run(path, optim, None)}
    for name in meshes:  # e.g. "2,4,1" = data 2 x fsdp 4 x tensor 1
        out[name] = run(path, optim, tuple(int(x) for x in name.split(",")))
    json.dump(out, open(out_dir + "/out.json", "w"))
