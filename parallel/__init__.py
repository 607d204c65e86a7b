"""twinpipe.parallel."""
