"""twinpipe.model."""
