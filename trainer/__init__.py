"""twinpipe.trainer."""
