"""Kill anywhere: SIGKILL a training run at random moments, re-run it, compare bitwise.

Each trial starts the same small ``launch.train`` command (a metrics row every 3 steps,
async checkpoints every 4, evaluation every 8, dropout on), SIGKILLs it, then runs the same
command again to the end. Checkpoints fall inside logging windows (4, 8, 16, 20 are not
multiples of 3), so most resumes start mid-window. Kill moments cycle through four kinds: a
uniformly random time (start-up, compile, training, saving, evaluating), at a logging
boundary (right after a row reached metrics.jsonl), while an asynchronous checkpoint is
being written (a ``*.orbax-checkpoint-tmp*`` directory exists), and during an evaluation
(after the "evaluating at step" log line). A trial passes when the re-run exits 0, resumed
from the newest committed checkpoint (or from scratch when there was none), its final
parameters are bitwise equal to an uninterrupted run's, and every row of metrics.jsonl
equals the uninterrupted run's row of that step in every key that does not depend on wall
time (``ROW_KEYS``), each step once.

    python -m bench.kill_resume --trials=50 --out=bench/kill_resume.md
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

from bench import harness
from xlps import checkpoint as checkpoint_lib

_TRIALS = flags.DEFINE_integer("trials", 50, "Kill-and-resume trials.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/xlps_kill_resume_tfds", "TFDS data dir.")
_OUT = flags.DEFINE_string("out", "", "Markdown report to write (besides stdout).")

ROOT = pathlib.Path(harness.ROOT)
STEPS = 24
KINDS = ("random", "log", "save", "eval")
# Every key of a row but the wall-time rates (steps/s, tokens/s, useful tokens/s, MFU).
ROW_KEYS = ("train_loss", "train_accuracy", "grad_norm", "learning_rate", "padding_fraction",
            "eval_loss", "eval_accuracy", "eval_perplexity")


def command(workdir: pathlib.Path) -> list[str]:
  overrides = {"data.data_dir": _DATA_DIR.value, "data.seq_len": 32, "model.max_len": 32,
               "data.eval_batches": 2, "train.num_steps": STEPS, "train.decay_steps": STEPS,
               "train.batch_size": 8, "train.log_every_steps": 3,
               "train.eval_every_steps": 8, "train.checkpoint_every_steps": 4,
               "train.async_checkpoints": True, "train.keep_checkpoints": 2,
               "model.dropout_rate": 0.1}
  return [sys.executable, "-m", "launch.train", "--config=configs/default.py:runlocal",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items())]


def committed(workdir: pathlib.Path) -> list[int]:
  ckpts = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def saving(workdir: pathlib.Path) -> bool:
  ckpts = workdir / "checkpoints"
  return ckpts.exists() and any("tmp" in p.name for p in ckpts.iterdir())


def final_params(workdir: pathlib.Path):
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    return ckpt.restore(STEPS)[0]
  finally:
    ckpt.close()


def rows(workdir: pathlib.Path) -> list[tuple]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [tuple([r["step"]] + [r.get(k) for k in ROW_KEYS]) for r in map(json.loads, lines)]


def logged(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def kill_when(proc: subprocess.Popen, workdir: pathlib.Path, log: pathlib.Path, kind: str,
              rng: random.Random, duration: float) -> str:
  """Kills ``proc`` at a moment of ``kind``; returns what was happening then."""
  start, target = time.time(), rng.randrange(6)  # which save / evaluation to hit
  seen = 0
  deadline = start + 3 * duration
  delay = rng.uniform(0.0, 0.8 * duration) if kind == "random" else None
  while proc.poll() is None and time.time() < deadline:
    if kind == "random" and time.time() - start >= delay:
      break
    if kind == "log" and logged(workdir) > target:
      break
    if kind == "save" and saving(workdir):
      seen += 1
      if seen > target:
        break
      while saving(workdir) and proc.poll() is None:
        time.sleep(0.001)
    if kind == "eval" and log.exists():
      evals = log.read_text().count("evaluating at step")
      if evals > min(target, 2):
        time.sleep(rng.uniform(0.0, 0.05))
        break
    time.sleep(0.002)
  if proc.poll() is not None:
    return "finished before the kill"
  was_saving = saving(workdir)
  text = log.read_text() if log.exists() else ""
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  last = text.strip().splitlines()[-1] if text.strip() else ""
  if kind == "log" and not was_saving and "evaluating at step" not in last:
    return "at a logging boundary"
  if "evaluating at step" in last:
    return "during evaluation" + (" and an async save" if was_saving else "")
  if was_saving:
    return "during an async save"
  if "Resumed from" not in text and "train step compiled" not in text:
    return "during start-up"
  return "during training"


def main(argv):
  del argv
  rng = random.Random(_SEED.value)
  root = pathlib.Path(tempfile.mkdtemp(prefix="xlps_kill_resume_"))
  t0 = time.time()
  ref = root / "reference"
  done = subprocess.run(command(ref), cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  duration = time.time() - t0
  ref_rows, ref_params = rows(ref), final_params(ref)
  results = []
  for trial in range(_TRIALS.value):
    kind = KINDS[trial % len(KINDS)]
    workdir, log = root / f"trial{trial}", root / f"trial{trial}.log"
    with log.open("w") as f:
      proc = subprocess.Popen(command(workdir), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
      moment = kill_when(proc, workdir, log, kind, rng, duration)
    before = committed(workdir)
    again = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True)
    resumed = re.search(r"Resumed from .* at step (\d+)", again.stderr)
    resumed_at = int(resumed.group(1)) if resumed else 0
    ok_exit = again.returncode == 0
    ok_resume = resumed_at == (before[-1] if before else 0)
    ok_params = ok_exit and all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final_params(workdir)),
                                             jax.tree.leaves(ref_params)))
    got_rows = rows(workdir) if ok_exit else []
    ok_metrics = got_rows == ref_rows
    equal_rows = sum(a == b for a, b in zip(got_rows, ref_rows))
    results.append(dict(trial=trial, kind=kind, moment=moment, committed=before[-1:] or [None],
                        resumed_at=resumed_at, exit=again.returncode, resume=ok_resume,
                        params=ok_params, metrics=ok_metrics, rows=len(ref_rows),
                        equal_rows=equal_rows, mid_window=resumed_at % 3 != 0,
                        mismatches=[(a, b) for a, b in zip(ref_rows, got_rows) if a != b]
                        + [(a, None) for a in ref_rows[len(got_rows):]]
                        + [(None, b) for b in got_rows[len(ref_rows):]]))
    r = results[-1]
    print(f"trial {trial:2d} {kind:6s} killed {moment:24s} newest committed "
          f"{r['committed'][0]!s:4s} resumed at {resumed_at:2d} exit {again.returncode} "
          f"resume {'ok' if ok_resume else 'WRONG'} params "
          f"{'bitwise' if ok_params else 'DIFFER'} rows {equal_rows}/{len(ref_rows)} equal",
          flush=True)
    if not (ok_exit and ok_resume and ok_params and ok_metrics):
      print(again.stderr[-2000:])
    else:
      shutil.rmtree(workdir)
  report(results, time.time() - t0, ref_rows)
  shutil.rmtree(root, ignore_errors=True)


def report(results: list[dict], seconds: float, ref_rows: list[tuple]) -> None:
  n = len(results)
  landed = [r for r in results if r["moment"] != "finished before the kill"]
  count = lambda key: sum(r[key] for r in results)  # noqa: E731
  moments = {}
  for r in results:
    moments[r["moment"]] = moments.get(r["moment"], 0) + 1
  lines = [
      "# Kill anywhere: SIGKILL, re-run, compare", "",
      "    " + harness.command(), "",
      f"{n} trials in {seconds / 60:.1f} min on {os.cpu_count()} CPU cores; each run "
      f"trains {STEPS} steps (a metrics row every 3, async checkpoints every 4, evaluation "
      f"every 8, dropout 0.1); each run writes {len(ref_rows)} rows, compared in "
      f"{', '.join(ROW_KEYS)}.", "",
      "| kill moment | trials |", "|---|---|",
      *(f"| {k} | {v} |" for k, v in sorted(moments.items())), "",
      "| check | passed |", "|---|---|",
      f"| kills that landed | {len(landed)} / {n} |",
      f"| re-run exited 0 | {sum(r['exit'] == 0 for r in results)} / {n} |",
      f"| resumed from the newest committed checkpoint | {count('resume')} / {n} |",
      f"| final params bitwise equal to the uninterrupted run | {count('params')} / {n} |",
      f"| resumed inside a logging window (step not a multiple of 3) | "
      f"{sum(r['mid_window'] and r['resumed_at'] > 0 for r in results)} / {n} |",
      f"| metrics.jsonl: every row equal to the uninterrupted run's | {count('metrics')} / {n} |",
      f"| rows equal / compared, all trials | {count('equal_rows')} / {count('rows')} |",
      "", "| trial | kill | moment | newest committed | resumed at | exit | params | rows equal |",
      "|---|---|---|---|---|---|---|---|",
      *(f"| {r['trial']} | {r['kind']} | {r['moment']} | {r['committed'][0]} | "
        f"{r['resumed_at']} | {r['exit']} | {'bitwise' if r['params'] else 'DIFFER'} | "
        f"{r['equal_rows']} / {r['rows']} |" for r in results),
      "", "Rows that differ from the uninterrupted run's (step, " + ", ".join(ROW_KEYS) + "):",
      *(f"- trial {r['trial']}: uninterrupted {a}, resumed {b}" for r in results
        for a, b in r["mismatches"]),
      *(["- none"] if not any(r["mismatches"] for r in results) else []),
  ]
  harness.report("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
