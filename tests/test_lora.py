"""LoRA against PEFT: injection, forward, parameter counts, the adapter format both ways."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import qlora_jax
from qlora_jax.lora import build_optimizer, count_parameters, trainable_mask
from qlora_jax.models import write_tiny_checkpoint

from bnb_ref import hf_model_on_our_base

IDS = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "base", "qwen2", num_hidden_layers=3)


def _peft_model(base, config: peft.LoraConfig, seed=0):
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf, config).eval()


def _logits_torch(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def _max_rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


TARGETS = [["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"], ["gate_proj"], ["up_proj"], ["down_proj"], "all-linear",
           r".*\.layers\.1\.mlp\.(up|down)_proj"]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_peft_adapter_loads_and_matches_peft_logits(base, tmp_path, targets, scan_layers):
    """A PEFT adapter written by PyTorch (random A and B, rsLoRA) gives PEFT's logits here.
    (alpha 2 with rsLoRA: scaling 1, so that the random B, unlike a trained one up to +-0.5,
    does not swamp the base model's output and the bar stays about the model's numerics.)"""
    cfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False, use_rslora=True,
                          task_type="CAUSAL_LM")
    pm = _peft_model(base, cfg)
    pm.save_pretrained(tmp_path)
    model = qlora_jax.load_adapter(qlora_jax.from_pretrained(base, scan_layers=scan_layers), tmp_path)
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), _logits_torch(pm)) < 1e-5
    assert count_parameters(model) == tuple(pm.get_nb_trainable_parameters())


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_saved_adapter_is_peft_format(base, tmp_path, scan_layers, capsys):
    model = qlora_jax.from_pretrained(base, scan_layers=scan_layers)
    config = qlora_jax.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False, layers_to_transform=[0, 2])
    qlora_jax.apply_lora(model, config, seed=3)
    qlora_jax.save_adapter(model, tmp_path / "ours")
    pm_ref = _peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                               layers_to_transform=[0, 2], task_type="CAUSAL_LM"))
    pm_ref.save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        if k not in ("init_lora_weights", "target_modules", "base_model_name_or_path"):
            assert ours[k] == theirs[k], k
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    assert ours["base_model_name_or_path"] == str(base)
    from safetensors.numpy import load_file

    ours_w, theirs_w = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
        load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours_w.items()} == {k: (v.shape, v.dtype) for k, v in theirs_w.items()}
    # and PEFT loads ours into the model we have
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), _logits_torch(pm)) < 1e-5
    qlora_jax.print_trainable_parameters(model)
    pm.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.strip().splitlines()[-2:]
    # PEFT loads for inference (nothing trainable): compare the totals; trainable counts are
    # compared against get_peft_model in test_peft_adapter_loads_and_matches_peft_logits
    assert mine.split("||")[1] == peft_line.split("||")[1]
    assert count_parameters(model)[0] == sum(v.numel() for v in pm_ref.parameters() if v.requires_grad)


def test_print_trainable_parameters_matches_peft_on_4bit_base(base, capsys):
    """PEFT counts a 4-bit weight as its logical size (2 x the packed uint8 numel); so do we."""
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    pm.print_trainable_parameters()
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig())
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    qlora_jax.print_trainable_parameters(model)
    theirs, ours = capsys.readouterr().out.strip().splitlines()[-2:]
    assert ours == theirs


def test_lora_on_nf4_base_matches_peft_on_the_dequantized_base(base, tmp_path):
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
    qlora_jax.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf_model_on_our_base(model, base), tmp_path).eval()
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), _logits_torch(pm)) < 1e-5


def test_fresh_adapter_is_a_no_op_and_initialised_as_peft(base):
    model = qlora_jax.from_pretrained(base)
    before = np.asarray(model(jnp.asarray(IDS)))
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=8, target_modules=["q_proj"]))
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(IDS))), before)  # B = 0
    a = np.asarray(model.layers.self_attn.q_proj.lora["default"].lora_A[...])
    assert a.shape == (3, 8, 64) and np.abs(a).max() <= 64 ** -0.5  # kaiming-uniform(a=sqrt(5)) bound
    assert np.abs(a).max() > 0.9 * 64 ** -0.5 and not np.allclose(a[0], a[1])  # per-layer draws
    g = qlora_jax.from_pretrained(base)
    qlora_jax.apply_lora(g, qlora_jax.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights="gaussian"))
    std = np.asarray(g.layers.self_attn.q_proj.lora["default"].lora_A[...]).std()
    assert abs(std - 1 / 8) < 0.02


def test_several_adapters_and_set_adapter(base, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        pm = _peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                               init_lora_weights=False, task_type="CAUSAL_LM"), seed=seed)
        pm.save_pretrained(tmp_path / name)
        np.save(tmp_path / f"{name}.npy", _logits_torch(pm))
    model = qlora_jax.from_pretrained(base)
    qlora_jax.load_adapter(model, tmp_path / "a", adapter_name="a")
    qlora_jax.load_adapter(model, tmp_path / "b", adapter_name="b")
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), np.load(tmp_path / "a.npy")) < 1e-5  # first stays active
    qlora_jax.set_adapter(model, "b")
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), np.load(tmp_path / "b.npy")) < 1e-5
    with pytest.raises(ValueError, match=r"adapter_name='c' is not loaded; loaded adapters: \['a', 'b'\]"):
        qlora_jax.set_adapter(model, "c")


def test_trainable_mask_and_optimizer_state(base):
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig())
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, target_modules="all-linear"))
    from flax import nnx

    state = nnx.state(model)
    mask = trainable_mask(state)
    flags = dict(nnx.to_flat_state(mask))
    assert flags[("layers", "self_attn", "q_proj", "lora", "default", "lora_A")] is True
    assert flags[("layers", "self_attn", "q_proj", "base_layer", "weight")] is False
    assert flags[("embed_tokens",)] is False and flags[("norm", "weight")] is False
    opt = build_optimizer(optax.adamw(1e-3), state)
    opt_state = jax.eval_shape(opt.init, state)  # no memory spent
    sized = [x for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0]
    lora_shapes = {tuple(v.get_value().shape) for p, v in nnx.to_flat_state(state) if flags[p]}
    assert sized and all(tuple(x.shape) in lora_shapes for x in sized)  # moments for adapters only
    n_opt = sum(int(np.prod(x.shape)) for x in sized)
    assert n_opt == 2 * count_parameters(model)[0]  # mu and nu, nothing for the frozen base


def test_merge_folds_the_adapter_into_a_dense_base(base):
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
    before = np.asarray(model(jnp.asarray(IDS)))
    qlora_jax.merge_adapters(model)
    assert not qlora_jax.lora._inject.lora_modules(model)
    w = model.layers.mlp.down_proj.weight.get_value()
    assert not isinstance(w, qlora_jax.QuantizedArray) and w.dtype == jnp.float32
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), before) < 1e-5


def test_bad_configs_and_adapters(base, tmp_path):
    for kw, needle in [({"r": 0}, "r=0 must be a positive integer"), ({"lora_alpha": 0}, "lora_alpha=0 must be positive"),
                       ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
                       ({"bias": "all"}, "bias='all' is not supported")]:
        with pytest.raises(ValueError, match=needle):
            qlora_jax.LoraConfig(**kw)
    model = qlora_jax.from_pretrained(base)
    with pytest.raises(ValueError, match=r"matches no linear module of this qwen2 model; its linear modules are named "
                                         r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj'"):
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(target_modules=["query_key_value"]))
    other = write_tiny_checkpoint(tmp_path / "other", "qwen2", hidden_size=96, num_hidden_layers=3)
    pm = _peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"has shape \(4, 96\); this model expects \(4, 64\)"):
        qlora_jax.load_adapter(qlora_jax.from_pretrained(base), tmp_path / "adapter")
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        qlora_jax.load_adapter(qlora_jax.from_pretrained(base), tmp_path)


def test_merged_checkpoint_loads_in_transformers_and_matches_peft(base, tmp_path, capsys):
    """`qlora-jax merge`: the NF4 base dequantized, the adapter folded in, written for transformers;
    its logits equal PEFT's on the same dequantized base (fp32 output here)."""
    from qlora_jax import cli

    pm = _peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                                           task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "adapter")
    assert cli.main(["merge", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged"),
                     "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "not re-quantized" in printed and "would have moved the merged weights by" in printed
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    nf4 = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    reference = peft.PeftModel.from_pretrained(hf_model_on_our_base(nf4, base), tmp_path / "adapter").eval()
    assert _max_rel(_logits_torch(merged), _logits_torch(reference)) < 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_reversible_merge_and_unmerge(base):
    """merge_adapters(keep_adapters=True) runs the merged dense weights (same logits); unmerge gives
    back the NF4 base bit for bit and the separate adapter path."""
    model = qlora_jax.from_pretrained(base, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
    before = np.asarray(model(jnp.asarray(IDS)))
    q_before = model.layers.mlp.up_proj.base_layer.weight.get_value()
    qlora_jax.merge_adapters(model, keep_adapters=True)
    assert not isinstance(model.layers.mlp.up_proj.base_layer.weight.get_value(), qlora_jax.QuantizedArray)
    assert _max_rel(np.asarray(model(jnp.asarray(IDS))), before) < 1e-5
    with pytest.raises(ValueError, match="already merged"):
        qlora_jax.merge_adapters(model, keep_adapters=True)
    qlora_jax.unmerge_adapters(model)
    q_after = model.layers.mlp.up_proj.base_layer.weight.get_value()
    for a, b in zip(jax.tree.leaves(q_before), jax.tree.leaves(q_after), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(IDS))), before)
    with pytest.raises(ValueError, match="no merged adapter to unmerge"):
        qlora_jax.unmerge_adapters(model)


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_lora_product_backward_is_autodiffs(adapter_dtype):
    """The adapter's written-out backward (``_lora_product``: the weight gradients contracted over
    tokens in the operands' own layout, the input saved as its bits) gives autodiff's
    gradients of ``(x.astype(A.dtype) @ A^T) @ B^T * scaling``, inputs of any leading shape."""
    from qlora_jax.lora._layers import _lora_product
    from qlora_jax.ops._residuals import stash

    keys = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(adapter_dtype)
    x = jax.random.normal(keys[0], (2, 24, 96)).astype(jnp.bfloat16)
    a = (0.1 * jax.random.normal(keys[1], (8, 96))).astype(dt)
    b = (0.1 * jax.random.normal(keys[2], (160, 8))).astype(dt)
    g = jax.random.normal(keys[3], (2, 24, 160)).astype(dt)

    def plain(x, a, b):
        h = x.astype(a.dtype)
        h = jax.lax.dot_general(h, a, (((2,), (1,)), ((), ())))
        return jax.lax.dot_general(h, b, (((2,), (1,)), ((), ()))) * 2.0

    y, vjp = jax.vjp(lambda x, a, b: _lora_product(x, *stash(x), a, b, 2.0), x, a, b)
    y_ref, vjp_ref = jax.vjp(plain, x, a, b)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    tol = 1e-6 if adapter_dtype == "float32" else 2 ** -7
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.dtype == want.dtype and got.shape == want.shape
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
