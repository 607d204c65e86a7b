"""twinpipe.data."""
