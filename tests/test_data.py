"""The SFT data pipeline: formats, loss masks, truncation, fixed-shape batches, resumable order."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from qlora_jax.data import (DataPosition, Fields, Tokenized, detect_format, epoch_order, iterate_batches,
                            load_records, pack, render, tokenize)
from qlora_jax.models import write_tiny_tokenizer
from qlora_jax.train import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_formats_are_detected_and_rendered(tok):
    f = Fields()
    assert detect_format(["text"], f) == "text"
    assert detect_format(["prompt", "completion"], f) == "prompt_completion"
    assert detect_format(["messages"], f) == "messages"
    assert detect_format(["instruction", "input", "output"], f) == "alpaca"
    with pytest.raises(ValueError, match=r"cannot tell the record format from the fields \['body', 'id'\]"):
        detect_format(["id", "body"], f)
    prompt, completion = render({"messages": [{"role": "user", "content": "2+2?"},
                                              {"role": "assistant", "content": "4"}]}, "messages", f, tok)
    assert prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" and completion == "4<|im_end|>\n"
    prompt, completion = render({"instruction": "Add", "input": "2 2", "output": "4"}, "alpaca", f, tok)
    assert "### Instruction:\nAdd" in prompt and "### Input:\n2 2" in prompt and completion == "4"
    with pytest.raises(ValueError, match=r"record lacks field\(s\) \['completion'\]"):
        render({"prompt": "x"}, "prompt_completion", f, tok)


def test_completion_only_loss_masks_the_prompt(tok, tmp_path):
    records = load_records(_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: abc\nA:", "completion": " xyz"}]))
    t = tokenize(records, tok, max_seq_length=64)
    ids, labels = t.input_ids[0], t.labels[0]
    n_prompt = len(tok("Q: abc\nA:")["input_ids"])
    assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n_prompt:] == ids[n_prompt:]).all()
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_prompt:-1]) == " xyz"
    full = tokenize(records, tok, max_seq_length=64, completion_only_loss=False)
    assert (full.labels[0] == full.input_ids[0]).all()


def test_truncation_is_counted(tok, tmp_path):
    rows = [{"text": "a" * 100}, {"text": "short"}]
    t = tokenize(load_records(_jsonl(tmp_path / "t.jsonl", rows)), tok, max_seq_length=32)
    assert t.num_truncated == 1 and len(t.input_ids[0]) == 32


def test_batches_have_bucketed_fixed_shapes_and_resume_exactly(tok, tmp_path):
    rows = [{"text": "x" * (i % 70 + 1)} for i in range(40)]
    data = tokenize(load_records(_jsonl(tmp_path / "b.jsonl", rows)), tok, max_seq_length=96)
    stream = iterate_batches(data, batch_size=4, micro_batches=2, max_seq_length=96, pad_token_id=3, seed=7)
    seen = [next(stream) for _ in range(8)]  # 5 batches per epoch: crosses into epoch 1
    for _, batch in seen:
        assert batch["input_ids"].shape[:2] == (2, 4) and batch["input_ids"].shape[2] in (64, 96)
        assert ((batch["labels"] == IGNORE_INDEX) | (batch["attention_mask"] == 1)).all()
    assert [p for p, _ in seen][4:6] == [DataPosition(0, 5), DataPosition(1, 1)]
    first_epoch_rows = np.concatenate([b["input_ids"].reshape(8, -1)[:, :1] for _, b in seen[:5]])
    assert len(first_epoch_rows) == 40  # every example once per epoch
    resumed = iterate_batches(data, batch_size=4, micro_batches=2, max_seq_length=96, pad_token_id=3, seed=7,
                              start=seen[2][0])
    for (p1, b1), (p2, b2) in zip(seen[3:], [next(resumed) for _ in range(5)], strict=True):
        assert p1 == p2 and all(np.array_equal(b1[k], b2[k]) for k in b1)
    other = iterate_batches(data, batch_size=4, micro_batches=2, max_seq_length=96, pad_token_id=3, seed=8)
    assert not np.array_equal(next(other)[1]["input_ids"], seen[0][1]["input_ids"])


def test_bad_datasets(tok, tmp_path):
    with pytest.raises(ValueError, match="the dataset is empty"):
        tokenize([], tok)
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "missing.jsonl")
    data = tokenize(load_records(_jsonl(tmp_path / "s.jsonl", [{"text": "a"}])), tok, max_seq_length=8)
    with pytest.raises(ValueError, match="1 examples do not fill one batch of 1 x 4"):
        next(iterate_batches(data, batch_size=4, max_seq_length=8, pad_token_id=3))


def _toy(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 200, n).astype(np.int32) for n in lengths]
    labels = [np.where(rng.random(n) < 0.3, IGNORE_INDEX, x).astype(np.int32) for n, x in zip(lengths, ids)]
    return Tokenized(ids, labels, 0)


def test_packing_is_best_fit_decreasing_and_keeps_every_example_whole():
    lengths = [50, 40, 30, 20, 64, 10, 9, 3, 60, 1]
    data = _toy(lengths)
    packed = pack(data, 64)
    # best fit decreasing by hand: 64 | 60+3+1 | 50+10 | 40+20 | 30+9
    assert sorted(len(r) for r in packed.input_ids) == [39, 60, 60, 64, 64]
    assert len(packed.input_ids) == 5 and all(len(r) <= 64 for r in packed.input_ids)
    seen = []
    for ids, labels, seg in zip(packed.input_ids, packed.labels, packed.segment_ids):
        assert len(ids) == len(labels) == len(seg)
        assert (np.diff(seg) >= 0).all() and seg[0] == 1  # contiguous segments 1..k
        for k in range(1, seg.max() + 1):
            part = ids[seg == k]
            match = [i for i, x in enumerate(data.input_ids) if len(x) == len(part) and (x == part).all()]
            assert len(match) == 1
            i = match[0]
            seen.append(i)
            expect = data.labels[i].copy()
            expect[0] = IGNORE_INDEX  # no example learns to predict across a boundary
            assert (labels[seg == k] == expect).all()
    assert sorted(seen) == list(range(len(lengths)))
    assert [len(r) for r in pack(data, 64).input_ids] == [len(r) for r in packed.input_ids]  # deterministic
    with pytest.raises(ValueError, match="an example has 64 tokens, more than max_seq_length=32"):
        pack(data, 32)


def test_packed_batches_carry_segment_ids_in_the_attention_mask():
    packed = pack(_toy([30, 20, 10, 5]), 64)
    _, batch = next(iterate_batches(packed, batch_size=2, max_seq_length=64, pad_token_id=0, shuffle=False))
    mask = batch["attention_mask"][0]
    for row, seg in zip(mask, packed.segment_ids):
        assert (row[:len(seg)] == seg).all() and (row[len(seg):] == 0).all()
    assert mask.max() == 3  # 30 + 20 + 10 in the first row, 5 alone in the second


@pytest.mark.parametrize("n,group", [(1000, 4), (16, 4), (37, 3)])
def test_group_by_length_matches_transformers_length_grouped_sampler(monkeypatch, n, group):
    import torch
    from transformers import trainer_pt_utils

    lengths = [int(x) for x in np.random.default_rng(n).integers(1, 50, n)]  # many ties: order must match too
    base = np.random.default_rng([1, 0]).permutation(n)
    # transformers draws its permutation with torch; hand it ours, the rest must agree exactly
    monkeypatch.setattr(trainer_pt_utils.torch, "randperm", lambda k, generator=None: torch.as_tensor(base))
    expect = trainer_pt_utils.get_length_grouped_indices(lengths, group)
    order = epoch_order(lengths, seed=1, epoch=0, group_size=group, group_by_length=True)
    assert order.tolist() == expect
    assert lengths[order[0]] == max(lengths)
    assert (epoch_order(lengths, seed=1, epoch=0, group_size=group) == base).all()


def test_local_file_kinds_load_the_same_records(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    ds = datasets.Dataset.from_list(rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    _jsonl(tmp_path / "d.jsonl", rows)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "d.jsonl", "d.csv", "d.parquet", "saved"):
        assert [dict(r) for r in load_records(tmp_path / name)] == rows, name
