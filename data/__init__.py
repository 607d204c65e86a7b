"""twinpipe.data: from text to packed, resumable, data-parallel micro-batches.

- `corpus`: the embedded default corpus (the interpreter's standard library sources), split by path hash.
- `tokenizer`: `TextTokenizer`, `load_tokenizer(path)`, `default_tokenizer(vocab_size, cache_dir)`.
- `sources`: `TextSource`, documents from local text/jsonl/parquet/arrow files via HF `datasets`.
- `packing`: the cached token array and packing into `seq_len + 1` token spans.
- `loader`: `PackedDataset`, `PackedLoader` (state = one global sample index), `eval_batches`.
- `records`: SFT records (messages / prompt-completion / text) from files via `datasets`, bad ones named
  by file and line; `chat`: chat templates (the tokenizer's or DeepSeek-V3's) and assistant-only targets;
  `sft`: the tokenized-example cache and `SFTDataset` (conversations packed with positions restarting).
- `build`: the same from the recipe's `data` section (`packed_dataset`, `train_loader`, `heldout_batches`,
  `sft_dataset`, `sft_train_loader`, `answer_prompts`).
"""
