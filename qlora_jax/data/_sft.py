"""Supervised fine-tuning data on top of ``datasets``: records -> token ids and loss labels -> batches.

Record formats (``format``, or "auto" from the record's fields): ``text`` (every token is
trained on); ``prompt_completion``; ``messages`` (chat, rendered with the tokenizer's chat
template, or ChatML when it has none); ``alpaca`` (instruction / input / output, the Stanford
Alpaca template). With ``completion_only_loss`` the prompt's tokens get the ignore index.

Batches have fixed shapes: rows are right-padded to a bucket length (a multiple of 64, at most
``max_seq_length``), so a run compiles a handful of programs, not one per batch. The order is a
seeded permutation per epoch; ``DataPosition`` (epoch, batches consumed) is all a checkpoint
needs to resume the exact stream.

Packing (``pack``) puts several examples into one row of ``max_seq_length`` tokens, best-fit
decreasing as TRL's ``packing_strategy="bfd"``: examples are never split, and the row's
attention mask holds segment ids (1, 2, ... per example, 0 for padding), so the model keeps
examples from attending to each other and restarts positions per example (no cross-example
contamination, the bug trl#1230 had). ``group_by_length`` orders each epoch as transformers'
``LengthGroupedSampler``: shuffled, then sorted by length within mega-batches of 50 batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np


IGNORE_INDEX = -100  # the label of tokens without loss, as transformers / PyTorch cross-entropy
FORMATS = ("text", "prompt_completion", "messages", "alpaca")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
BUCKET = 64

_LOCAL = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(path: str | os.PathLike, split: str = "train"):
    """A ``datasets.Dataset`` from a local JSON/JSONL/CSV/Parquet file or directory, or a hub name."""
    import datasets

    p = Path(path)
    if p.suffix in _LOCAL:
        if not p.exists():
            raise ValueError(f"data file {str(p)!r} does not exist")
        return datasets.load_dataset(_LOCAL[p.suffix], data_files=str(p), split="train")
    if p.is_dir():
        return datasets.load_from_disk(str(p)) if (p / "dataset_info.json").exists() else \
            datasets.load_dataset(str(p), split=split)
    return datasets.load_dataset(str(path), split=split)  # a hub dataset (needs network)


@dataclasses.dataclass(frozen=True)
class Fields:
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"


def detect_format(columns, fields: Fields) -> str:
    cols = set(columns)
    if fields.messages in cols:
        return "messages"
    if {fields.prompt, fields.completion} <= cols:
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if fields.text in cols:
        return "text"
    raise ValueError(f"cannot tell the record format from the fields {sorted(cols)}; expected "
                     f"'{fields.text}' (text), '{fields.prompt}' + '{fields.completion}', '{fields.messages}', or "
                     "'instruction' + 'output' (alpaca); set data.format and the *_field names")


def render(record: dict, fmt: str, fields: Fields, tokenizer) -> tuple[str, str]:
    """(prompt text, completion text) of one record."""
    def need(*names):
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"record lacks field(s) {missing} that data.format={fmt!r} needs; it has "
                             f"{sorted(record)}")

    if fmt == "text":
        need(fields.text)
        return "", str(record[fields.text])
    if fmt == "prompt_completion":
        need(fields.prompt, fields.completion)
        return str(record[fields.prompt]), str(record[fields.completion])
    if fmt == "alpaca":
        need("instruction", "output")
        extra = str(record.get("input") or "")
        template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
        return template.format(instruction=record["instruction"], input=extra), str(record["output"])
    if fmt == "messages":
        need(fields.messages)
        messages = list(record[fields.messages])
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat record must end with an assistant message (the completion to learn)")
        template = getattr(tokenizer, "chat_template", None) or CHATML
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True,
                                               chat_template=template)
        full = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the conversation differently from its prompt part; "
                             "completion-only loss cannot find the boundary")
        return prompt, full[len(prompt):]
    raise ValueError(f"data.format={fmt!r} is not supported; expected one of {FORMATS}")


@dataclasses.dataclass
class Tokenized:
    """Per row: token ids, loss labels and, for packed rows, segment ids (1..k per example)."""

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    num_truncated: int
    segment_ids: list[np.ndarray] | None = None


def tokenize(records, tokenizer, *, fmt: str = "auto", fields: Fields = Fields(), max_seq_length: int = 1024,
             completion_only_loss: bool = True) -> Tokenized:
    """Token ids and labels per record (prompt tokens ignored with ``completion_only_loss``), EOS
    appended, truncated to ``max_seq_length`` (counted)."""
    if len(records) == 0:
        raise ValueError("the dataset is empty")
    if fmt == "auto":
        fmt = detect_format(records.column_names if hasattr(records, "column_names") else records[0].keys(), fields)
    eos = tokenizer.eos_token_id
    ids_out, labels_out, truncated = [], [], 0
    for record in records:
        prompt, completion = render(dict(record), fmt, fields, tokenizer)
        full = tokenizer(prompt + completion)["input_ids"]
        if eos is not None and (not full or full[-1] != eos):
            full = full + [eos]
        n_prompt = len(tokenizer(prompt)["input_ids"]) if prompt else 0
        ids = np.asarray(full, np.int32)
        labels = ids.copy()
        if completion_only_loss:
            labels[:n_prompt] = IGNORE_INDEX
        if len(ids) > max_seq_length:
            ids, labels, truncated = ids[:max_seq_length], labels[:max_seq_length], truncated + 1
        ids_out.append(ids)
        labels_out.append(labels)
    return Tokenized(ids_out, labels_out, truncated)


def pack(data: Tokenized, max_seq_length: int) -> Tokenized:
    """Examples packed into rows of at most ``max_seq_length`` tokens, best-fit decreasing (longest
    first, each into the fullest row that still has room), deterministic. Each example keeps its
    tokens and labels, except that its first token's label is ignored: in a row, the previous
    token belongs to another example and must not be trained to predict it (unpacked, the first
    label is never used either). Rows carry segment ids for the model's attention mask."""
    if data.segment_ids is not None:
        raise ValueError("data is already packed")
    lengths = [len(x) for x in data.input_ids]
    if max(lengths) > max_seq_length:
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_seq_length={max_seq_length}; "
                         "truncate first (tokenize does)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, row) sorted: bisect finds the fullest row that fits
    rows: list[list[int]] = []
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = max_seq_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    ids, labels, segments = [], [], []
    for members in rows:
        ids.append(np.concatenate([data.input_ids[i] for i in members]))
        row_labels = []
        for i in members:
            lab = data.labels[i].copy()
            lab[0] = IGNORE_INDEX
            row_labels.append(lab)
        labels.append(np.concatenate(row_labels))
        segments.append(np.concatenate([np.full(lengths[i], k + 1, np.int32) for k, i in enumerate(members)]))
    return Tokenized(ids, labels, data.num_truncated, segments)


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream is: the epoch and the number of batches already consumed in it."""

    epoch: int = 0
    batch: int = 0


def bucket_length(n: int, max_seq_length: int) -> int:
    return min(max(BUCKET, math.ceil(n / BUCKET) * BUCKET), max_seq_length)


def batches_per_epoch(num_examples: int, batch_size: int, micro_batches: int) -> int:
    return num_examples // (batch_size * micro_batches)


def epoch_order(lengths: list[int], *, seed: int, epoch: int, group_size: int, shuffle: bool = True,
                group_by_length: bool = False) -> np.ndarray:
    """The order of the examples in ``epoch``: a permutation seeded by (seed, epoch); with
    ``group_by_length``, as transformers' ``get_length_grouped_indices``: each mega-batch of
    ``min(n // (4 * group_size), 50) * group_size`` examples (at least one group) sorted longest first, and the longest example of all moved to the
    front (an out-of-memory shows at the first step, not hours in)."""
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if not group_by_length:
        return order
    size = max(min(n // (group_size * 4), 50), 1) * group_size
    groups = [sorted(order[i:i + size].tolist(), key=lambda j: -lengths[j]) for i in range(0, n, size)]
    heads = [lengths[g[0]] for g in groups]
    top = int(np.argmax(heads))
    groups[0][0], groups[top][0] = groups[top][0], groups[0][0]
    return np.asarray([j for g in groups for j in g])


def iterate_batches(data: Tokenized, *, batch_size: int, micro_batches: int = 1, max_seq_length: int,
                    pad_token_id: int, seed: int = 0, start: DataPosition = DataPosition(),
                    shuffle: bool = True, group_by_length: bool = False) -> Iterator[tuple[DataPosition, dict]]:
    """Endless stream of (position after this batch, batch); each batch holds ``micro_batches`` x
    ``batch_size`` rows as arrays [micro_batches, batch_size, bucket]. Incomplete last batches
    of an epoch are dropped; each epoch is a fresh permutation from ``seed`` (``shuffle=False``:
    the rows in order; ``group_by_length``: see ``epoch_order``). Packed rows (``pack``) put their
    segment ids in ``attention_mask``."""
    n = len(data.input_ids)
    per_epoch = batches_per_epoch(n, batch_size, micro_batches)
    if per_epoch == 0:
        raise ValueError(f"{n} examples do not fill one batch of {micro_batches} x {batch_size}")
    epoch, b = start.epoch, start.batch
    lengths = [len(x) for x in data.input_ids]
    while True:
        order = epoch_order(lengths, seed=seed, epoch=epoch, group_size=batch_size * micro_batches,
                            shuffle=shuffle, group_by_length=group_by_length)
        while b < per_epoch:
            idx = order[b * batch_size * micro_batches:(b + 1) * batch_size * micro_batches]
            length = bucket_length(max(len(data.input_ids[i]) for i in idx), max_seq_length)
            ids = np.full((len(idx), length), pad_token_id, np.int32)
            labels = np.full((len(idx), length), IGNORE_INDEX, np.int32)
            mask = np.zeros((len(idx), length), np.int32)
            for row, i in enumerate(idx):
                k = len(data.input_ids[i])
                ids[row, :k], labels[row, :k] = data.input_ids[i], data.labels[i]
                mask[row, :k] = 1 if data.segment_ids is None else data.segment_ids[i]
            shape = (micro_batches, batch_size, length)
            b += 1
            yield DataPosition(epoch, b), {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
                                           "labels": labels.reshape(shape)}
        epoch, b = epoch + 1, 0
