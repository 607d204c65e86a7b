"""Model tests run tiny models whose ops are too small to gain from a second thread; one thread keeps
them fast and steady when the two CI cores are shared."""

import torch

torch.set_num_threads(1)
