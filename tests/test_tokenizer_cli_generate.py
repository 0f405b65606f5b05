"""Tiny checkpoints written by transformers with a real tokenizer; `qlora-jax generate` end to end."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_jax import cli
from qlora_jax.models import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tok") / "m", "mistral", sliding_window=8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_arch_writes_loadable_files(tmp_path, arch):
    path = write_tiny_checkpoint(tmp_path, arch)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == arch


def test_tokenizer_round_trip_and_chat_template(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    text = "Héllo, QLoRA!\n\tbytes: \u00e9\u4e2d"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, len(tok)) == ("<s>", "</s>", "<pad>", 262)


def test_cli_generate_matches_transformers(tiny, capsys):
    tok = AutoTokenizer.from_pretrained(tiny, padding_side="left")
    hf = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager").eval()
    prompts = ["Hello there", "A"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf.generate(**batch, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    expected = [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    args = ["generate", str(tiny), "--quant-type", "none", "--dtype", "float32", "--max-new-tokens", "6"]
    for p in prompts:
        args += ["--prompt", p]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed == "".join(f"### {p}\n{e}\n" for p, e in zip(prompts, expected))


def test_cli_generate_nf4_chat(tiny, capsys):
    assert cli.main(["generate", str(tiny), "--prompt", "hi", "--chat", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("### hi\n")


def test_cli_generate_with_a_peft_adapter_matches_peft(tiny, tmp_path, capsys):
    import peft

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation="eager")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    pm.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny)
    batch = tok(["Hi"], return_tensors="pt")
    with torch.no_grad():
        out = pm.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    args = ["generate", str(tiny), "--adapter", str(tmp_path), "--quant-type", "none", "--dtype", "float32",
            "--max-new-tokens", "5", "--prompt", "Hi"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out == f"### Hi\n{expected}\n"
