"""`python -m twinpipe.trainer` is `twinpipe-train` (so torchrun and srun can start it)."""

from twinpipe.trainer.train import main

if __name__ == "__main__":
    main()
