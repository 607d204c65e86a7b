"""twinpipe.fp8."""
