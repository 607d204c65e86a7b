"""What an operator reads (issue 18): progress as plain lines in a file, smoothed plots, start-up
checks of what would fail at the first step, summary.json and the closing line."""

import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twinpipe.trainer import metrics, preflight
from twinpipe.trainer.metrics import Progress, ema, output_is_terminal
from twinpipe.trainer.plots import curve_figure, make_plots
from twinpipe.trainer.summary import summarize
from trainer_recipe import TINY, make_cfg

STEPS = 3


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return env


@pytest.fixture(scope="module")
def logged_run(data_dir, tmp_path_factory):
    """One twinpipe-train run with stdout and stderr sent to a file (as SLURM does), progress on."""
    tmp = tmp_path_factory.mktemp("operator")
    run_dir, log_file = tmp / "run", tmp / "train.log"
    args = [*TINY, f"data.tokenizer={data_dir / 'tok'}", f"data.cache_dir={data_dir / 'cache'}",
            f"run.dir={run_dir}", f"train.steps={STEPS}", "logging.progress=true", "logging.every_s=1e-6",
            "logging.plots=true", "checkpoint.every=2", "checkpoint.keep=1"]
    with open(log_file, "wb") as out:
        proc = subprocess.run([str(Path(sys.executable).with_name("twinpipe-train")), *args], env=_env(),
                              cwd=tmp, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = log_file.read_bytes()
    assert proc.returncode == 0, text[-3000:]
    return run_dir, text


# -- 1. progress -----------------------------------------------------------------------------------

def test_progress_in_a_file_is_plain_lines(logged_run):
    _, text = logged_run
    assert b"\r" not in text
    lines = [x for x in text.decode().splitlines() if "twinpipe.trainer.metrics: step " in x]
    assert len(lines) == STEPS, lines  # every_s ~ 0: one line per logged step
    for i, line in enumerate(lines, 1):
        assert f"step {i}/{STEPS} " in line and "| loss " in line and "| lr " in line
        assert " tok/s | eta " in line


def _record(step, loss=5.0, **extra):
    return {"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 1000.0, "tokens": 256.0 * step, **extra}


def test_progress_lines_are_throttled_and_a_terminal_gets_the_bar(caplog, capsys):
    caplog.set_level(logging.INFO, logger="twinpipe.trainer.metrics")
    progress = Progress(total_steps=5, start_step=0, every_s=3600.0, terminal=False)
    for step in range(1, 6):
        progress.update(_record(step, eval_loss=4.5) if step == 3 else _record(step))
    lines = [r.getMessage() for r in caplog.records]
    assert [x.split(" (")[0] for x in lines] == ["step 1/5", "step 5/5"]  # first, then the last step
    assert lines[-1].endswith("| eval_loss 4.5000")  # the latest evaluation stays on the line
    assert "\r" not in capsys.readouterr().err

    bar = Progress(total_steps=5, start_step=0, every_s=3600.0, terminal=True)
    bar.update(_record(1))
    bar.close()
    assert "\r" in capsys.readouterr().err  # tqdm redraws in place on a terminal


def test_terminal_means_both_streams(monkeypatch):
    tty, file = io.StringIO(), io.StringIO()
    tty.isatty = lambda: True
    for out, err, expected in ((tty, tty, True), (tty, file, False), (file, tty, False)):
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        assert output_is_terminal() is expected


# -- 2. plots ----------------------------------------------------------------------------------

def _ema_by_definition(values, window):
    a = 2.0 / (window + 1)
    out = []
    for t in range(len(values)):
        w = [(1 - a) ** i for i in range(t + 1)]
        out.append(sum(wi * values[t - i] for i, wi in enumerate(w)) / sum(w))
    return out


def _noisy_records(n=200):
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(n, generator=gen) * 2 - 1).tolist()  # +-1 nat, as a small batch's loss swings
    records = []
    for i in range(n):
        rec = _record(i + 1, loss=6.0 - 2.0 * i / n + noise[i], mtp_loss=6.5 - 2.0 * i / n + noise[i])
        if (i + 1) % 20 == 0:
            rec["eval_loss"] = 5.8 - 2.0 * i / n
        records.append(rec)
    return records


def test_loss_plot_has_raw_and_smoothed_curves():
    records = _noisy_records()
    fig = curve_figure(records, ("loss", "mtp_loss", "eval_loss", "reward"), "nats")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"loss (LM + λ·MTP) (raw)", "loss (LM + λ·MTP), EMA over 20 steps", "MTP loss (raw)",
                          "MTP loss, EMA over 20 steps", "held-out LM loss (raw)",
                          "held-out LM loss, EMA over 20 steps"}  # 200 points: window 20; eval: 10 x 20 steps
    raw, smooth = lines["loss (LM + λ·MTP) (raw)"], lines["loss (LM + λ·MTP), EMA over 20 steps"]
    losses = [r["loss"] for r in records]
    assert raw.get_alpha() < 0.5 and smooth.get_alpha() is None  # raw faint, EMA solid
    assert list(raw.get_ydata()) == losses
    assert list(smooth.get_xdata()) == [r["step"] for r in records]
    assert smooth.get_ydata() == pytest.approx(_ema_by_definition(losses, 20), rel=1e-12)
    # the trend shows: step-to-step swings of the EMA are a fraction of the raw ones
    jumps = lambda ys: sum(abs(b - a) for a, b in zip(ys, ys[1:])) / (len(ys) - 1)
    assert jumps(list(smooth.get_ydata())) < 0.15 * jumps(losses)
    evals = lines["held-out LM loss, EMA over 20 steps"]
    assert list(evals.get_xdata()) == list(range(20, 201, 20))
    (tokens_axis,) = ax.child_axes
    assert tokens_axis.get_xlabel() == "tokens"
    assert curve_figure(records, ("reward", "accuracy"), "reward") is None  # nothing logged: no figure


def test_make_plots_writes_what_was_logged(tmp_path):
    records = _noisy_records(40)
    for r in records:
        r["reward"] = 0.5 + 0.01 * r["step"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = {p.name for p in make_plots(tmp_path)}
    assert written == {"loss.png", "reward.png", "lr.png"}  # no exact match, no expert load logged
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


def test_ema_matches_its_definition():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    assert ema(values, 3) == pytest.approx(_ema_by_definition(values, 3), rel=1e-12)
    assert ema(values, 1) == values  # a window of one point is the raw curve


# -- 3. start-up checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.dp=2", "parallel.schedule=dualpipev", "train.micro_batch=2"],
     "parallel.schedule=dualpipev with parallel.pp=2 needs >= 2 x parallel.pp = 4 micro-batches per rank, but "
     "train.global_batch=8 / (train.micro_batch=2 x parallel.dp=2) = 2"),
    (["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batch=2", "train.global_batch=10"],
     "parallel.schedule=dualpipe with parallel.pp=2 needs an even number >= 2 x parallel.pp = 4 micro-batches "
     "per rank, but train.global_batch=10 / (train.micro_batch=2 x parallel.dp=1) = 5"),
    (["parallel.pp=2", "parallel.schedule=dualpipe", "train.micro_batch=1", "optim.ramp_start=4",
      "optim.ramp_tokens=1024"],
     "but at step 3 the batch ramp (optim.ramp_start=4) gives 5 / (train.micro_batch=1 x parallel.dp=1) = 5"),
    (["parallel.pp=3", "parallel.schedule=dualpipev", "train.micro_batch=1"],
     "model.num_hidden_layers=2 < 6 pipeline stages (parallel.schedule=dualpipev with parallel.pp=3)"),
    (["train.seq_len=4096", "model.max_position_embeddings=2048"],
     "train.seq_len=4096 > model.max_position_embeddings=2048 (the model's context)"),
    (["train.seq_len=1"], "train.seq_len=1: MTP depth model.num_nextn_predict_layers=1 needs train.seq_len > 1"),
    (["parallel.dp=3", "parallel.ep=3", "train.global_batch=6"],
     "model.n_routed_experts=8 is not divisible by parallel.ep=3"),
    (["parallel.dp=2", "parallel.ep=2", "eplb.replicas=6"], "eplb.replicas=6 < model.n_routed_experts=8"),
    (["parallel.dp=4", "parallel.ep=4", "eplb.replicas=10"], "eplb.replicas=10 is not a multiple of parallel.ep=4"),
    (["parallel.dp=2", "parallel.ep=2", "model.first_k_dense_replace=2"],
     "parallel.ep=2: the model has no MoE layer to spread (model.first_k_dense_replace=2 >= "
     "model.num_hidden_layers=2)"),
])
def test_start_up_check_names_keys_and_numbers(data_dir, tmp_path, overrides, message):
    cfg = make_cfg(data_dir, tmp_path, *overrides)
    with pytest.raises(ValueError) as err:
        preflight.check(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_problem_in_one_line(data_dir, tmp_path):
    cfg = make_cfg(data_dir, tmp_path, "parallel.pp=3", "parallel.schedule=dualpipev", "train.seq_len=4096")
    found = preflight.problems(cfg)
    assert [m.split(" ")[0] for m in found] == ["parallel.schedule=dualpipev", "model.num_hidden_layers=2",
                                               "train.seq_len=4096"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine cuBLAS may run")
def test_cublas_without_a_hopper_gpu_is_a_start_up_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"fp8.backend=cublas: no CUDA device .*allowed here: off, emulate"):
        preflight.check(make_cfg(data_dir, tmp_path, "fp8=cublas"))


@pytest.mark.parametrize("overrides", [
    ["parallel.pp=2", "parallel.schedule=dualpipev", "train.micro_batch=2", "model.num_hidden_layers=4"],
    ["parallel.pp=2", "parallel.schedule=1f1b", "train.micro_batch=8"],  # 1F1B: one micro-batch is enough
    ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=dualpipe", "train.micro_batch=1"],
    ["parallel.dp=4", "parallel.ep=4", "eplb.replicas=12", "eplb.every=2"],
])
def test_recipes_that_run_pass(data_dir, tmp_path, overrides):
    assert preflight.problems(make_cfg(data_dir, tmp_path, *overrides)) == []


def test_ramp_batch_sizes_are_the_loops(data_dir, tmp_path):
    from twinpipe.trainer.optim.schedule import batch_size_at

    cfg = make_cfg(data_dir, tmp_path, "train.micro_batch=1", "optim.ramp_start=2", "optim.ramp_tokens=2000",
                   "train.steps=100")
    sizes, tokens, loop = preflight.batch_sizes(cfg), 0.0, []
    for step in range(1, 101):
        batch = batch_size_at(cfg.optim, 8, tokens, 1)
        if not loop or loop[-1][1] != batch:
            loop.append((step, batch))
        tokens += batch * 32
    assert sizes == loop and sizes[0] == (1, 2) and sizes[-1][1] == 8


def test_the_cli_stops_before_the_first_step_with_one_line(data_dir, tmp_path):
    """The issue's DualPipeV example: one line, exit 1, before any process group or model (the check
    runs first, so one process shows it; tests/launch/test_user_errors.py shows that under torchrun
    such a line comes from rank 0 only and every rank exits 1)."""
    cmd = [sys.executable, "-m", "twinpipe.trainer", *TINY, f"data.tokenizer={data_dir / 'tok'}",
           f"run.dir={tmp_path / 'run'}", "parallel.pp=2", "parallel.schedule=dualpipev", "train.micro_batch=4"]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "twinpipe-train: parallel.schedule=dualpipev with parallel.pp=2 needs >= 2 x parallel.pp = 4 micro-batches "
        "per rank, but train.global_batch=8 / (train.micro_batch=4 x parallel.dp=1) = 2: raise the batch or lower "
        "train.micro_batch; model.num_hidden_layers=2 < 4 pipeline stages (parallel.schedule=dualpipev with "
        "parallel.pp=2): every stage needs at least one block"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- 4. summary ------------------------------------------------------------------------------------

def test_summary_json_and_closing_line(logged_run):
    run_dir, text = logged_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = metrics.read_metrics(run_dir)
    losses = [r["loss"] for r in rows]
    assert summary["steps"] == summary["steps_this_run"] == STEPS
    assert summary["tokens"] == summary["tokens_this_run"] == STEPS * 8 * 32
    assert 0 < summary["wall_s"] < 300
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["wall_s"])
    assert summary["step_tokens_per_s"] > summary["tokens_per_s"]  # steps alone: no checkpoint, no plots
    assert summary["final_loss"] == losses[-1] and summary["best_loss"] == min(losses)
    assert summary["best_loss_step"] == 1 + losses.index(min(losses))
    assert summary["final_mtp_loss"] == rows[-1]["mtp_loss"]
    assert summary["mfu"] is None  # CPU: no known peak
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / f"step_{STEPS}")
    assert summary["stopped_by_signal"] is False
    closing = text.decode().splitlines()[-1]
    assert f"twinpipe.trainer.summary: done: step {STEPS}, 768 tokens (this run: {STEPS} steps in " in closing
    assert f"loss {losses[-1]:.4f} (best {min(losses):.4f} at step {summary['best_loss_step']}" in closing
    assert closing.endswith(f"checkpoint {summary['checkpoint']}, summary {run_dir / 'summary.json'}")
    assert (run_dir / "loss.png").stat().st_size > 1000


def test_summary_of_a_resumed_run_with_eval_and_mfu():
    """Steps 1-10 were an earlier process; this one trained 11-20 (its MFU and speed only), with an
    evaluation every 5 steps; best loss and best eval loss over the whole run."""
    records = [_record(s, loss=5.0 - 0.1 * s + (0.5 if s == 20 else 0.0), global_batch=8,
                       tokens_per_s=100.0 * s, mfu=0.01 * s) for s in range(1, 21)]
    for r in records[4::5]:
        r["eval_loss"] = 6.0 - 0.05 * r["step"]
    got = summarize(records, 20, 5120.0, 10, 2560.0, 4.0, Path("run/checkpoints/step_20"))
    assert (got["steps"], got["steps_this_run"], got["tokens_this_run"], got["tokens_per_s"]) == (20, 10, 2560.0, 640.0)
    assert got["mfu"] == pytest.approx(sum(0.01 * s for s in range(11, 21)) / 10)
    assert got["step_tokens_per_s"] == pytest.approx(10 / sum(1 / (100.0 * s) for s in range(11, 21)))
    assert got["final_loss"] == pytest.approx(3.5) and got["best_loss"] == pytest.approx(3.1)
    assert got["best_loss_step"] == 19
    assert (got["final_eval_loss"], got["best_eval_loss_step"]) == (pytest.approx(5.0), 20)
    assert got["final_eval_loss_ema"] == pytest.approx(_ema_by_definition([6.0 - 0.25 * k for k in range(1, 5)], 1)[-1])
    assert "reward" not in "".join(got) and got["checkpoint"] == "run/checkpoints/step_20"
    assert math.isfinite(got["final_loss_ema"])
