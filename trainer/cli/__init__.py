"""The command lines besides twinpipe-train: generate, evaluate (perplexity, lm-eval `harness`), convert, plan, and their schemas (`config`)."""
