"""twinpipe.data: from text to packed, resumable, data-parallel micro-batches.

- `corpus`: the embedded default corpus (the interpreter's standard library sources), split by path hash.
- `tokenizer`: `TextTokenizer`, `load_tokenizer(path)`, `default_tokenizer(vocab_size, cache_dir)`.
- `sources`: `TextSource`, documents from local text/jsonl/parquet/arrow files via HF `datasets`.
- `packing`: the cached token array and packing into `seq_len + 1` token spans.
- `loader`: `PackedDataset`, `PackedLoader` (state = one global sample index), `eval_batches`.
- `build`: the same from the recipe's `data` section (`packed_dataset`, `train_loader`, `heldout_batches`).
"""
