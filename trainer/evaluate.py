"""`twinpipe-eval`: perplexity of a model on a text file.

    twinpipe-eval --checkpoint runs/try1 --text-file heldout.txt --seq-len 512

The text is tokenized, followed by eos (as in pretraining), cut into windows of `seq-len + 1` tokens
that overlap by one token, so every token after the first is predicted exactly once, with at most
`seq-len` tokens of context. `perplexity` is the same work on token ids in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token negative log-likelihood over `ids` and its exp: {nll, ppl, tokens}."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    device = model.embed_tokens.weight.device
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        width = max(len(w) for w in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, w in enumerate(chunk):
            tokens[row, : len(w)] = torch.tensor(w)
            labels[row, : len(w) - 1] = torch.tensor(w[1:])
        logits = model(tokens[:, :-1].to(device)).float()                           # [b, width-1, V]
        nll = F.cross_entropy(logits.flatten(0, 1), labels[:, :-1].flatten().to(device),
                              ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((labels[:, :-1] != -100).sum())
    return {"nll": total / count, "ppl": math.exp(total / count), "tokens": float(count)}


def evaluate_text(model, tokenizer, text: str, seq_len: int, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of `text` (tokenized without special tokens, then eos)."""
    return perplexity(model, tokenizer.encode(text) + [tokenizer.eos_id], seq_len, batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="twinpipe-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, run dir or HF folder")
    ap.add_argument("--text-file", required=True, type=Path)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def run(argv: list[str] | None = None) -> dict[str, float]:
    """The CLI's work: load, score, print one JSON line; returns the result."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.text_file.is_file():
        raise SystemExit(f"--text-file {args.text_file}: no such file")
    from twinpipe.trainer.checkpoint import load_model_for_inference

    model, tokenizer = load_model_for_inference(args.checkpoint, DTYPES[args.dtype])
    model = model.to(args.device)
    result = evaluate_text(model, tokenizer, args.text_file.read_text(encoding="utf-8"), args.seq_len,
                           args.batch_size)
    sys.stdout.write(json.dumps(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    """Console-script entry (returns None: a returned value would become the exit status)."""
    run(argv)


if __name__ == "__main__":
    main()
