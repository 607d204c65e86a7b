"""twinpipe.bench."""
