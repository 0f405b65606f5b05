"""8-bit blockwise AdamW against bitsandbytes' AdamW8bit on the same gradients."""

import numpy as np
import optax
import pytest
import torch

import bitsandbytes as bnb
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
import jax
import jax.numpy as jnp

from qlora_jax.train._optim8bit import Blockwise8bit, adamw_8bit


def _bnb_default_quantize(A, code, blocksize):
    """bitsandbytes' own pure-torch blockwise quantizer (backends/default/ops.py,
    ``quantize_blockwise``), verbatim: its CUDA rule (nearest code), unlike its native CPU
    kernel, which looks codes up in a 65536-entry table too coarse for the unsigned map near zero
    (where Adam's second moments live): about 10% of those codes land one step off."""
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A_flat[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).reshape(A.shape), absmax


def test_fifty_steps_match_bitsandbytes_adamw8bit(monkeypatch):
    """A 2-D tensor, one with a partial last block (5000 = 19 x 256 + 136) and one under
    min_8bit_size (fp32 moments): after every step the 8-bit codes and absmax equal bitsandbytes'
    (its CPU optimizer kernel with its pure-torch quantizer) and the parameters agree to a few fp32
    ulps (ours applies the step as p + (new - p))."""
    def quantize(A_fp32, code, absmax_out, out_uint8, blocksize):
        out, absmax = _bnb_default_quantize(A_fp32, code, blocksize)
        out_uint8.copy_(out)
        absmax_out.copy_(absmax)

    monkeypatch.setattr(bnb_cpu_ops, "_quant_blockwise_fp32_direct", quantize)
    rng = np.random.default_rng(0)
    shapes = {"a": (64, 128), "b": (300,), "c": (5000,)}
    init = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    lr, wd = 1e-3, 0.01
    ref = bnb.optim.AdamW8bit(list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    tx = adamw_8bit(lr, weight_decay=wd)
    params = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(params)
    assert isinstance(state.mu["a"], Blockwise8bit) and isinstance(state.mu["b"], jax.Array)
    update = jax.jit(tx.update)
    for _ in range(50):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        for k in shapes:
            torch_params[k].grad = torch.from_numpy(grads[k].copy())
        ref.step()
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in ("a", "c"):
            theirs = ref.state[torch_params[k]]
            np.testing.assert_array_equal(np.asarray(state.mu[k].codes), theirs["state1"].numpy())
            np.testing.assert_array_equal(np.asarray(state.nu[k].codes), theirs["state2"].numpy())
            np.testing.assert_allclose(np.asarray(state.mu[k].absmax), theirs["absmax1"].numpy(), rtol=1e-6)
            np.testing.assert_allclose(np.asarray(state.nu[k].absmax), theirs["absmax2"].numpy(), rtol=1e-6)
        for k in shapes:
            np.testing.assert_allclose(np.asarray(params[k]), torch_params[k].detach().numpy(), rtol=0, atol=1e-6)
    moved = max(float(np.abs(np.asarray(params[k]) - init[k]).max()) for k in shapes)
    assert moved > 0.01  # 50 steps of lr 1e-3 really moved the parameters


def test_state_is_a_quarter_of_fp32_adamw_and_small_tensors_stay_fp32():
    params = {"big": jnp.zeros((4096, 16)), "edge": jnp.zeros((4096,)), "small": jnp.zeros((4095,))}
    state = adamw_8bit(1e-3).init(params)
    assert isinstance(state.mu["edge"], Blockwise8bit) and not isinstance(state.mu["small"], Blockwise8bit)
    ours = sum(x.nbytes for x in jax.tree.leaves({k: (state.mu[k], state.nu[k]) for k in ("big",)}))
    fp32 = sum(x.nbytes for x in jax.tree.leaves(optax.adamw(1e-3).init({"big": params["big"]})))
    assert ours / fp32 == pytest.approx(0.25 + 1 / 256, abs=1e-3)  # codes + one fp32 absmax per 256
