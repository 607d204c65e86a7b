"""twinpipe.recipes."""
