"""SFT data: records from ``datasets``, rendered and tokenized with loss masks, in fixed-shape batches."""

from ._sft import (ALPACA_NO_INPUT, ALPACA_WITH_INPUT, BUCKET, CHATML, FORMATS, DataPosition, Fields, Tokenized,
                   batches_per_epoch, bucket_length, detect_format, epoch_order, iterate_batches, load_records, pack,
                   render, tokenize)

__all__ = ["ALPACA_NO_INPUT", "ALPACA_WITH_INPUT", "BUCKET", "CHATML", "DataPosition", "FORMATS", "Fields",
           "Tokenized", "batches_per_epoch", "bucket_length", "detect_format", "epoch_order", "iterate_batches",
           "load_records", "pack", "render", "tokenize"]
