"""Checkpoints: atomic, sharded (torch.distributed.checkpoint), resumable under another layout.

Layout of `run.dir/checkpoints/step_N/`:
    __0_0.distcp, .metadata   the training state: {"model": model state dict (router biases are
                              buffers in it), "optim": ZeRO-1 shards as DTensors of the flat vectors}.
                              With pipeline parallelism every rank saves the modules it holds under
                              the full model's names (DCP merges them; DualPipe's identical copies are
                              written once) and its optimizer bucket under `dense_pp{r}_of{pp}`, so the
                              model part is one full model (`load_model_for_inference` reads it).
                              With expert parallelism the EP ranks hold different experts under the
                              same names: "model" holds everything else, each layer's placement
                              `...experts.phy2log` [R] included, and "model_experts_ep{r}_of{ep}" the
                              physical slots of EP rank r (`...experts.local.*` [R/ep, ...]), so
                              `load_model_for_inference` can rebuild the logical experts offline; their
                              AdamW state is under "optim" -> `experts_ep{r}`.
    rank_R.pt                 per-rank state: data-loader position and RNG states (torch.save of
                              tensors, ints and dicts; read back with weights_only=True)
    meta.json                 step, tokens consumed, the layout (pp, dp, ep, schedule, expert_slots,
                              zero) and `segments`: bucket key -> [[parameter, offset, numel], ...]
    config.yaml, tokenizer.json
    SHA256SUMS                the SHA-256 of every file above (`twinpipe.trainer.checkpoint.checksum`)
    COMPLETE                  written last, before the folder gets its final name

A save writes everything into `checkpoints/.tmp-step_N`, then rank 0 writes `COMPLETE` and renames
the folder to `step_N` (a rename is atomic). A crash mid-write leaves only a `.tmp-*` folder, which
`resume=auto` ignores and the next save removes, so the newest `step_N` is always whole; a failed
write (a full disk) removes it and raises, naming the previous complete checkpoint, which is untouched.
Before a checkpoint is read its checksums are verified: `resume=auto` passes over a corrupt one with a
warning naming the file and takes the previous complete one; a path (resume=PATH, twinpipe-convert,
-generate, -eval) stops with a one-line error naming the file. `checkpoint.keep` counts the checkpoint
just written first, so pruning never deletes it (the newest verified one) in favour of a newer-numbered
folder left from another run. The scheduler needs no state of its own: the LR, λ and γ are functions
of (step, tokens) from meta.json.

With checkpoint.async_save=true `checkpoint_writer.CheckpointWriter` stages the state to host memory and
runs `save_checkpoint` in a writer thread (collectives over a gloo group of its own) while training goes on.

A resume under the saved pp, schedule and ep (any dp) is `load_checkpoint`: one DCP load of the same
keys. Under another pp, schedule or ep the keys differ; `twinpipe.trainer.checkpoint.reshard` then rebuilds each
rank's state parameter by parameter from the `segments` table and the saved expert placements.
Every read is ranged (`ranged.RangedReader`): only the elements a rank asks for leave the disk, never
a whole saved chunk, and the inference loader and `twinpipe-convert` read the experts of an EP
checkpoint one logical expert at a time (`ranged.ModelTensors`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from twinpipe.model.safetensors_io import CheckpointError
from twinpipe.trainer.checkpoint import format as fmt
from twinpipe.trainer.checkpoint.checksum import file_sha256, first_mismatch, hash_files, write_sums
from twinpipe.trainer.checkpoint.ranged import ModelTensors, RangedReader

log = logging.getLogger(__name__)

COMPLETE = fmt.COMPLETE
MODEL_KEY = fmt.MODEL
# fault injection for the crash tests: "save:N" kills the process (SIGKILL) in the middle of
# writing the checkpoint of step N, after the shards and before COMPLETE
FAULT_ENV = "TWINPIPE_FAULT"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / fmt.CHECKPOINTS


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = fmt.STEP_DIR.match(d.name)
            if m and (d / COMPLETE).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(resume: str, run_dir: str | Path, key: str = "resume") -> Optional[Path]:
    """The checkpoint folder to start from, its checksums verified: `auto` = the newest complete one
    that verifies (a corrupt one is passed over with a warning naming its bad file; none: None),
    `never`, or PATH (a corrupt one is a CheckpointError naming the file). `key` is the recipe key the
    value came from, for the error messages. With a process group every rank calls this together."""
    if resume == "never":
        return None
    if resume == "auto":
        for _, folder in reversed(complete_checkpoints(run_dir)):
            problem = first_mismatch(folder)
            if problem is None:
                return folder
            log.warning("resume=auto: %s; falling back to the previous complete checkpoint", problem)
        return None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        found = complete_checkpoints(path)  # a run dir is accepted too: its newest checkpoint
        if not found:
            allowed = "; allowed: auto, never, or such a path" if key == "resume" else ""
            raise FileNotFoundError(f"{key}={resume}: not a complete checkpoint folder (no {COMPLETE} "
                                    f"marker) nor a run dir with one{allowed}")
        path = found[-1][1]
    problem = first_mismatch(path)
    if problem is not None:
        hint = "; resume=auto would fall back to an older checkpoint" if key == "resume" else ""
        raise CheckpointError(f"{key}={resume}: {problem}{hint}")
    return path


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """Silence DCP's 'assuming the intent is to save in a single process' (that is our intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _barrier(group: Any = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _maybe_fault(stage: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{stage}:{step}":
        log.warning("%s=%s: killing this process now (crash test)", FAULT_ENV, os.environ[FAULT_ENV])
        os.kill(os.getpid(), 9)


def _all_ok(ok: bool, group: Any = None) -> bool:
    """True on every rank (of `group`) when `ok` is True on every rank."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _write_failed(root: Path, tmp: Path, step: int, error: BaseException | None) -> CheckpointError:
    """The one-line error of a failed save (what failed, the free space left), after removing its
    partial folder (rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(error, CheckpointException):  # DCP's: the first failing rank's own exception
        rank, (error, _) = min(error.failures.items())
        why = f"rank {rank}: {type(error).__name__}: {error}"
    else:
        why = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
    free = shutil.disk_usage(root).free / 2**30
    found = complete_checkpoints(root.parent)
    kept = f"the previous complete checkpoint {found[-1][1]} is intact" if found else "no earlier checkpoint"
    return CheckpointError(f"checkpoint step {step} not written ({why.splitlines()[0]}; {free:.1f} GiB free "
                           f"under {root}); {kept}")


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], rank_state: dict[str, Any],
                    meta: dict[str, Any], config_yaml: str, tokenizer: Any, keep: int, group: Any = None) -> Path:
    """Write checkpoint `step` atomically (all ranks call this together), with its checksums; keep the
    newest `keep` (this one first). A failed write raises a CheckpointError on every rank and leaves the
    earlier checkpoints as they were. `group`: the process group of its collectives (default: the
    world's; `checkpoint_writer` writes from a thread of its own over a gloo group of its own)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = checkpoint_root(run_dir)
    final = root / fmt.step_dir(step)
    tmp = root / (fmt.TMP_PREFIX + fmt.step_dir(step))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(group)
    error = None
    try:
        with single_process_quiet():
            dcp.save(state, checkpoint_id=tmp, process_group=group, no_dist=not dist.is_initialized())
        torch.save(rank_state, tmp / fmt.rank_state_file(rank))
    except (Exception, CheckpointException) as exc:  # a full disk, a quota (DCP wraps them in its own type)
        error = exc
    if not _all_ok(error is None, group):
        raise _write_failed(root, tmp, step, error) from error
    _maybe_fault("save", step)
    digests = hash_files(tmp, [p.name for p in tmp.iterdir() if p.is_file()], group)
    if rank == 0:
        try:
            (tmp / fmt.CONFIG).write_text(config_yaml)
            if tokenizer is not None:
                tokenizer.save(tmp)
            (tmp / fmt.META).write_text(json.dumps(meta, indent=1))
            written = [p.name for p in tmp.iterdir() if p.is_file() and p.name not in digests]
            write_sums(tmp, {**digests, **{name: file_sha256(tmp / name) for name in written}})
        except OSError as exc:
            error = exc
    if not _all_ok(error is None, group):
        raise _write_failed(root, tmp, step, error) from error
    if rank == 0:
        with open(tmp / COMPLETE, "w") as f:
            f.write(f"step {step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (a resumed run ending where it started)
            old = root / f".old-step_{step}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
        _prune(run_dir, keep, final)
        log.info("checkpoint step %d -> %s", step, final)
    _barrier(group)
    return final


def _prune(run_dir: str | Path, keep: int, newest: Path) -> None:
    """Keep `newest` (just written and verified) and the newest `keep - 1` other complete ones."""
    others = [d for _, d in reversed(complete_checkpoints(run_dir)) if d != newest]
    for d in others[max(keep - 1, 0):]:
        shutil.rmtree(d, ignore_errors=True)
    for d in checkpoint_root(run_dir).glob(fmt.TMP_PREFIX + fmt.step_dir("*")):  # leftovers of crashed saves
        shutil.rmtree(d, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / fmt.META).read_text())


def read_rank_state(path: Path) -> dict[str, Any]:
    """This rank's per-rank state: rank_<rank>.pt when the checkpoint had this rank, else rank 0's (a
    resume with more ranks than were saved; the data loader re-splits its position itself)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = Path(path) / fmt.rank_state_file(rank)
    return torch.load(own if own.is_file() else Path(path) / fmt.rank_state_file(0), weights_only=True)


def load_checkpoint(path: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill `state` in place from `path` saved under this run's layout (dp may differ: DCP re-splits
    the ZeRO shards); return (meta, this rank's rank state). Another pp, schedule or ep goes through
    `twinpipe.trainer.checkpoint.reshard.load_resharded` instead."""
    meta = read_meta(path)
    saved = saved_tensors(path)
    for top, part in state.items():
        if top != MODEL_KEY and not fmt.EXPERT_WEIGHTS.match(top):
            continue
        absent = [f"{top}.{k}" for k in part if f"{top}.{k}" not in saved]
        if absent:
            raise CheckpointError(
                f"{path}: the model state of this run is not all there: no key {absent[0]} ({len(absent)} "
                "missing); saved under a different model config?")
    with single_process_quiet():
        dcp.load(state, storage_reader=RangedReader(path), no_dist=not dist.is_initialized())
    return meta, read_rank_state(path)


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_pos": random.getstate()[2], "numpy_keys": torch.from_numpy(np_state[1].copy()),
           "numpy_pos": int(np_state[2])}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy(), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_model_for_inference(path: str | Path, dtype: torch.dtype = torch.float32,
                             key: str = "checkpoint", ema: bool = False) -> tuple[Any, Any]:
    """(Transformer in eval mode, TextTokenizer) from one of our checkpoints or an HF DeepSeek-V3 folder.

    `path` may be a `checkpoints/step_N` folder, a run dir (its newest complete checkpoint) or an HF
    folder (config.json + safetensors, loaded with `twinpipe.model.load_hf`); errors name it `key`.
    `ema`: the parameters are the checkpoint's EMA of the weights (`checkpoint_format.EMA`)."""
    from omegaconf import OmegaConf

    from twinpipe.data.tokenizer import load_tokenizer

    path = Path(path)
    if (path / "config.json").is_file() and not (path / COMPLETE).is_file():
        if ema:
            raise CheckpointError(f"{key}={path}: an HF folder has no EMA of the weights; ema=true reads "
                                  "twinpipe checkpoints of runs with train.ema_decay > 0")
        from twinpipe.model import load_hf

        model = load_hf(path, dtype=dtype)
        return model.eval(), load_tokenizer(path)
    ckpt = resolve_resume(str(path), path, key)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: neither a twinpipe checkpoint nor an HF folder with config.json")
    from twinpipe.model import Transformer
    from twinpipe.trainer.build import model_config

    cfg = OmegaConf.load(ckpt / fmt.CONFIG)
    model = Transformer(model_config(cfg.model))
    model.load_state_dict(_read_model_state(ckpt, model.state_dict(), model.config.n_routed_experts))
    if ema:
        model.load_state_dict(_read_ema(ckpt, model, key), strict=False)
    model.to(dtype)
    for module in model.modules():  # router biases stay fp32 (as in HF checkpoints)
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.data = bias.data.float()
    return model.eval(), load_tokenizer(ckpt / fmt.TOKENIZER)


def _read_ema(ckpt: Path, model: torch.nn.Module, key: str) -> dict[str, torch.Tensor]:
    """The EMA of every parameter of the plain `model` saved in `ckpt` (fp32), by parameter name (the
    EMA of an expert-parallel run's slots merged into the logical experts, as the weights are)."""
    if not any(k.startswith(fmt.EMA + ".") for k in saved_tensors(ckpt)):
        raise CheckpointError(f"{key}={ckpt}: no EMA of the weights (no key {fmt.EMA}.*): the run had "
                              "train.ema_decay=0; ema=false reads its weights")
    plain = {n: torch.empty(p.shape, dtype=torch.float32) for n, p in model.named_parameters()}
    return _read_model_state(ckpt, plain, model.config.n_routed_experts, top=fmt.EMA,
                             experts=(fmt.EMA_EXPERTS, fmt.ema_experts_key))


def saved_tensors(ckpt: Path) -> dict[str, Any]:
    """What the checkpoint's DCP metadata lists: flat "top.name" key -> its storage metadata."""
    return dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata


def empty_saved(ckpt: Path, saved: dict[str, Any], flat: str) -> torch.Tensor:
    """An empty tensor of the size and dtype checkpoint `ckpt` saved under key `flat` (`saved` is its
    `saved_tensors`), for dcp.load to fill; a CheckpointError when the key is absent or not a tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = saved.get(flat)
    if not isinstance(meta, TensorStorageMetadata):
        raise CheckpointError(f"{ckpt}: {flat} is " + ("not in the checkpoint" if meta is None else "not a tensor"))
    return torch.empty(meta.size, dtype=meta.properties.dtype)


def _read_model_state(ckpt: Path, plain: dict[str, torch.Tensor], num_experts: int, top: str = MODEL_KEY,
                      experts: tuple[Any, Any] = (fmt.EXPERT_WEIGHTS, fmt.expert_weights_key)) -> dict[str, torch.Tensor]:
    """Fill `plain` (the plain model's state dict, or some of its names, in their shapes) from checkpoint
    `ckpt`, in one process, and return it. A checkpoint of an expert-parallel run has the experts as
    physical slots per EP rank plus each layer's placement: each logical expert is read from its first
    slot (`ModelTensors`), one expert at a time, so the memory is `plain`'s own. `top` and `experts`
    (the pattern and key of the EP ranks' slots) name another copy of the weights saved the same way
    (the EMA); the placement is always the model's."""
    tensors = ModelTensors(ckpt, num_experts, top, experts)
    whole = {k: v for k, v in plain.items() if f"{top}.{k}" in tensors.saved}
    if len(whole) < len(plain) and not tensors.ep:  # no expert parallelism: `top` is the plain model
        missing = [k for k in plain if k not in whole]
        raise CheckpointError(f"{ckpt}: the checkpoint lacks {len(missing)} tensors of the model of its "
                              f"config.yaml, e.g. {top}.{missing[0]} (saved under a different model "
                              "config?)")
    with single_process_quiet():
        dcp.load({top: whole}, storage_reader=tensors.reader, no_dist=True)
    for name, value in plain.items():
        if name not in whole:
            for expert in range(value.shape[0]):
                value[expert].copy_(tensors.expert(name, expert))
    return plain
