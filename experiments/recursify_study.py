"""Relaxed Recursive Transformers (Bae et al., ICLR 2025) on a byte-level LM: recursify a
trained unshared model into M shared slots (+ per-layer LoRA) vs the same shape from scratch.

Per seed: an unshared 6-layer decoder LM (``configs/default.py:unshared,runlocal``: d_model
64, 2 heads, d_ff 128, SwiGLU, RMSNorm, pre-LN) trains SOURCE_STEPS steps on the stdlib
corpus. ``launch.recursify`` turns it into M = 3 (N/2) and M = 2 (N/3) slots in CYCLE order
with each slot init (average, stepwise, lower) and LoRA rank 0, 4, 16 (SVD init, with bias
offsets); each continues for CONT_STEPS steps (learning rate 1e-3). Baselines: the unshared
source itself continued the same way (recursify with M = N, order sequence: the identity),
and each (M, rank) trained from scratch (LoRA B = 0 at init) for CONT_STEPS (the same
uptraining budget) and for SOURCE_STEPS + CONT_STEPS (the same total budget), learning rate
3e-3 as the source. Each job is pinned to one core (``taskset``), so a re-run repeats it.

    python experiments/recursify_study.py --root=/tmp/recursify_study --parallel=2
    python experiments/recursify_study.py --root=/tmp/recursify_study --report \
        --out=experiments/results/recursify

The first command skips finished jobs (their workdir has ``done.json``) and restarts
interrupted ones; the second writes
results.csv, results.md and loss_vs_unique_params.png into --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import threading

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 6
SOURCE_STEPS, CONT_STEPS = 600, 300
NUM_UNIQUE = (3, 2)
RANKS = (0, 4, 16)
INITS = ("average", "stepwise", "lower")
SEEDS = (0, 1)
COMMON = {"train.batch_size": 16, "data.seq_len": 64, "model.max_len": 64,
          "train.warmup_steps": 30, "train.log_every_steps": 50, "data.eval_batches": 16}


def flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def schedule(steps: int, lr: float) -> dict:
  return {"train.num_steps": steps, "train.decay_steps": steps, "train.learning_rate": lr,
          "train.eval_every_steps": steps, "train.checkpoint_every_steps": steps}


def jobs(root: pathlib.Path) -> list[dict]:
  """Every job: name, kind, seed, M, rank, init, the commands, and the job it waits for."""
  py = sys.executable
  out = []
  for seed in SEEDS:
    base = root / f"seed={seed}"
    source = base / "source"
    out.append({"name": f"seed={seed}/source", "kind": "source", "seed": seed, "M": N,
                "rank": 0, "init": "", "after": None, "commands": [
                    [py, "-m", "launch.train", "--config=configs/default.py:unshared,runlocal",
                     f"--workdir={source}", f"--config.seed={seed}",
                     *flags({**COMMON, **schedule(SOURCE_STEPS, 3e-3)})]]})
    recursified = [("original", N, 0, "lower", "sequence")] + [
        ("recursified", m, r, init, "cycle")
        for m in NUM_UNIQUE for r in RANKS for init in INITS]
    for kind, m, r, init, order in recursified:
      name = f"seed={seed}/{kind},M={m},rank={r},init={init}"
      workdir = root / name
      out.append({"name": name, "kind": kind, "seed": seed, "M": m, "rank": r, "init": init,
                  "after": f"seed={seed}/source", "commands": [
                      [py, "-m", "launch.recursify", f"--from={source}", f"--workdir={workdir}",
                       f"--num_unique={m}", f"--order={order}", f"--init={init}",
                       f"--lora_rank={r}", "--lora_init=svd"],
                      [py, "-m", "launch.train", f"--config=configs/workdir.py:{workdir}",
                       f"--workdir={workdir}", *flags({**COMMON, **schedule(CONT_STEPS, 1e-3)})]]})
    for m in NUM_UNIQUE:
      for r in RANKS:
        for steps, kind in ((CONT_STEPS, "scratch"), (SOURCE_STEPS + CONT_STEPS, "scratch_total")):
          name = f"seed={seed}/{kind},M={m},rank={r}"
          model = {"model.num_layers": N, "model.sharing.num_unique": m,
                   "model.sharing.order": "cycle", "model.lora.rank": r,
                   "model.lora.bias": r > 0}
          out.append({"name": name, "kind": kind, "seed": seed, "M": m, "rank": r, "init": "",
                      "after": None, "commands": [
                          [py, "-m", "launch.train", "--config=configs/default.py:runlocal",
                           f"--workdir={root / name}", f"--config.seed={seed}",
                           *flags({**COMMON, **model, **schedule(steps, 3e-3)})]]})
  return out


def run_all(root: pathlib.Path, parallel: int) -> None:
  """Runs the unfinished jobs, ``parallel`` at a time, each pinned to its own core."""
  todo = [j for j in jobs(root) if not (root / j["name"] / "done.json").exists()]
  done = {j["name"] for j in jobs(root)} - {j["name"] for j in todo}
  lock = threading.Condition()
  failed = []

  def worker(core: int):
    while True:
      with lock:
        ready = [j for j in todo if j["after"] is None or j["after"] in done]
        while not ready and todo:
          lock.wait()
          ready = [j for j in todo if j["after"] is None or j["after"] in done]
        if not todo:
          return
        job = ready[0]
        todo.remove(job)
      workdir = root / job["name"]
      if workdir.exists():  # an interrupted job: start it afresh
        shutil.rmtree(workdir)
      workdir.parent.mkdir(parents=True, exist_ok=True)
      ok = True
      for cmd in job["commands"]:
        print(f"[core {core}] {job['name']}: {' '.join(cmd[1:4])} ...", flush=True)
        result = subprocess.run(["taskset", "-c", str(core), *cmd], cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode:
          print(f"FAILED {job['name']}:\n{result.stderr[-3000:]}", flush=True)
          ok = False
          break
      with lock:
        if ok:
          (workdir / "done.json").write_text(json.dumps({"commands": job["commands"]}))
          done.add(job["name"])
        else:
          failed.append(job["name"])
          todo[:] = [j for j in todo if j["after"] != job["name"]]
        lock.notify_all()

  threads = [threading.Thread(target=worker, args=(c % os.cpu_count(),)) for c in range(parallel)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failed:
    sys.exit(f"failed jobs: {failed}")


def collect(root: pathlib.Path) -> list[dict]:
  """One row per finished job: its settings, unique params and final eval loss."""
  sys.path.insert(0, str(ROOT))
  from configs import workdir as workdir_config
  from xlps import metrics, models
  rows = []
  for job in jobs(root):
    workdir = root / job["name"]
    if not (workdir / "done.json").exists():
      continue
    evals = [r for r in metrics.read_records(workdir) if "eval_loss" in r]
    summary = models.summarize(models.spec_of(workdir_config.get_config(str(workdir))), 64)
    rows.append({"kind": job["kind"], "M": job["M"], "rank": job["rank"], "init": job["init"],
                 "seed": job["seed"], "unique_params": summary["unique_params"],
                 "step": evals[-1]["step"], "eval_loss": evals[-1]["eval_loss"]})
  return rows


def report(root: pathlib.Path, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = collect(root)
  out.mkdir(parents=True, exist_ok=True)
  with (out / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["kind"], row["M"], row["rank"], row["init"]), []).append(row)
  lines = ["| kind | M | LoRA rank | init | unique params | steps | eval loss (mean +- std) | seeds |",
           "|---|---|---|---|---|---|---|---|"]
  stats = {}
  for key, group in groups.items():
    losses = [r["eval_loss"] for r in group]
    mean = statistics.fmean(losses)
    std = statistics.stdev(losses) if len(losses) > 1 else 0.0
    stats[key] = (group[0]["unique_params"], mean, std)
    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3] or '-'} | {group[0]['unique_params']:,} "
                 f"| {group[0]['step']} | {mean:.4f} +- {std:.4f} | {len(losses)} |")
  (out / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, ax = plt.subplots(figsize=(9, 5))
  styles = {"source": ("k", "x"), "original": ("k", "*"), "recursified": (None, "o"), "scratch": ("grey", "s"),
            "scratch_total": ("grey", "D")}
  colors = {"average": "C0", "stepwise": "C1", "lower": "C2"}
  for (kind, m, rank, init), (params, mean, std) in sorted(stats.items()):
    color, marker = styles[kind]
    label = f"{kind}" + (f", init {init}" if init and kind == "recursified" else "")
    ax.errorbar(params, mean, yerr=std, color=color or colors[init], marker=marker, capsize=3,
                ls="none", label=label)
    if init in ("", "stepwise"):  # one label per point group (the inits sit together)
      ax.annotate(f"M={m},r={rank}", (params, mean), fontsize=6, xytext=(4, 2),
                  textcoords="offset points")
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
  ax.set(xscale="log", xlabel="unique parameters", ylabel="final eval loss, nats/byte",
         title=f"recursified (+{CONT_STEPS} steps) vs from scratch, N = {N}")
  fig.tight_layout()
  fig.savefig(out / "loss_vs_unique_params.png", dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", required=True, type=pathlib.Path)
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--report", action="store_true")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "experiments/results/recursify")
  args = parser.parse_args()
  if args.report:
    report(args.root, args.out)
  else:
    run_all(args.root, args.parallel)
