"""Recursive reasoning on 4x4 Sudoku: TRM's latent recursion vs its ablations (issue 25).

TRM (Jolicoeur-Martineau 2025) claims, on Sudoku-Extreme: (1) backpropagating through the
whole last recursion cycle beats HRM's one-step gradient by 30.9 points (87.4 vs 56.5),
and recursion beats (2) the same small net without recursion and (3) deeper nets. Scaled
down to what learns in minutes on 2 CPU cores, four models on generated 4x4 Sudoku
(5 givens; 200 train puzzles with TRM's augmentation, 128 test puzzles whose solution
grids are not among the train puzzles'), softmax cross-entropy, AdamW at 1e-3 (no weight decay, 50 warmup updates):

* ``trm``: one 2-layer post-norm net (d_model 64, 2 heads, SwiGLU 256), T = 2 cycles of
  n = 2 latent updates + 1 answer update (12 applied layers per supervision step; the first
  cycle without gradient), N_sup = 4 supervision steps (one update each), BCE halting;
* ``one_step``: the same with HRM's one-step gradient (the last z and y updates only);
* ``plain``: the same 2-layer net applied once (equal parameters, no recursion);
* ``deep``: 12 unshared layers applied once (equal applied FLOPs per supervision step;
  6x the parameters).

All get the same number of optimizer updates (``UPDATES``; the recursive models make up to
N_sup per batch, so they run UPDATES / N_sup batches) and the same EMA (0.99) for
evaluation. The recursive models are evaluated at 1..8 supervision steps (twice the
trained 4) without halting (``eval_sequence_accuracy_step{s}``) and, as trained, at their
halting step. Two seeds.

    python -m launch.sweep --experiment=experiments/recursive_reasoning.py \
        --workdir=/tmp/recursive_reasoning --parallel=2

``report`` writes accuracy.md (mean +- std over seeds), accuracy_vs_steps.md and
accuracy_vs_steps.png into the sweep's workdir; results: experiments/results/
recursive_reasoning/README.md.
"""

import statistics

from xlps import sweep

CONFIG = "configs/puzzle.py:size=4,runlocal,variant={variant}"
BASE = CONFIG.format(variant="trm")
VARIANTS = {"trm": "TRM (last cycle backprop)", "one_step": "one-step gradient (HRM's)",
            "plain": "no recursion, equal params", "deep": "12 unshared layers, equal FLOPs"}
RECURSIVE = ("trm", "one_step")
SUPERVISION_STEPS = 4
EVAL_STEPS = 8
UPDATES = 1200
COMMON = {"data.num_train_examples": 200, "data.num_eval_examples": 128,
          "train.loss": "softmax_cross_entropy", "train.learning_rate": 1e-3,
          "train.weight_decay": 0.0, "train.warmup_steps": 50, "train.ema_decay": 0.99}


def get_grid() -> list[dict]:
  return sweep.product([{"variant": v} for v in VARIANTS], sweep.seeds(0, 1))


def steps(point: dict, workdir, root) -> sweep.Steps:
  variant = point["variant"]
  batches = UPDATES // SUPERVISION_STEPS if variant in RECURSIVE else UPDATES
  overrides = {"seed": point["seed"], "train.num_steps": batches, "train.decay_steps": batches,
               "train.log_every_steps": batches // 10, "train.eval_every_steps": batches,
               "train.checkpoint_every_steps": batches}
  if variant in RECURSIVE:
    overrides.update({"model.recursion.supervision_steps": SUPERVISION_STEPS,
                      "model.recursion.eval_supervision_steps": EVAL_STEPS})
  return sweep.Steps(CONFIG.format(variant=variant), overrides)


def _stats(values: list[float]) -> tuple[float, float, int]:
  return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
          len(values))


def report(root, rows: list[dict]) -> None:
  """accuracy.md (exact and per-cell test accuracy, mean +- std over seeds, and the wall
  time), accuracy_vs_steps.md and accuracy_vs_steps.png (the recursive models' exact
  accuracy after each test-time supervision step)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  lines = ["| model | exact (answer at halting) | cells | mean supervision steps | "
           "train wall s | seeds |", "|---|---|---|---|---|---|"]
  for variant, label in VARIANTS.items():
    mine = [r for r in rows if r["variant"] == variant]
    if not mine:
      continue
    cell = lambda key: "{:.3f} +- {:.3f}".format(*_stats([float(r[key]) for r in mine])[:2])  # noqa: E731
    depth = (cell("final_eval_supervision_steps") if variant in RECURSIVE else "1")
    wall = statistics.fmean(float(r["wall_time_s"]) for r in mine)
    lines.append(f"| {label} | {cell('final_eval_sequence_accuracy')} | "
                 f"{cell('final_eval_accuracy')} | {depth} | {wall:.0f} | {len(mine)} |")
  (root / "accuracy.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))

  curve = {}
  for variant in RECURSIVE:
    for s in range(1, EVAL_STEPS + 1):
      values = [float(r[f"final_eval_sequence_accuracy_step{s}"]) for r in rows
                if r["variant"] == variant]
      if values:
        curve[variant, s] = _stats(values)
  lines = ["| test-time supervision steps | " + " | ".join(VARIANTS[v] for v in RECURSIVE)
           + " |", "|---|---|---|"]
  for s in range(1, EVAL_STEPS + 1):
    cells = [f"{curve[v, s][0]:.3f} +- {curve[v, s][1]:.3f}" if (v, s) in curve else ""
             for v in RECURSIVE]
    lines.append(f"| {s}{' (beyond training)' if s > SUPERVISION_STEPS else ''} | "
                 + " | ".join(cells) + " |")
  (root / "accuracy_vs_steps.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, variant in enumerate(RECURSIVE):
    points = [s for s in range(1, EVAL_STEPS + 1) if (variant, s) in curve]
    if points:
      ax.errorbar([s + (i - 0.5) * 0.08 for s in points], [curve[variant, s][0] for s in points],
                  yerr=[curve[variant, s][1] for s in points], marker="o", capsize=3,
                  label=f"{VARIANTS[variant]}, {curve[variant, points[0]][2]} seeds")
  for j, variant in enumerate(("plain", "deep")):
    values = [float(r["final_eval_sequence_accuracy"]) for r in rows if r["variant"] == variant]
    if values:
      ax.axhline(statistics.fmean(values), color=f"C{2 + j}", ls="--", lw=1,
                 label=f"{VARIANTS[variant]} (one pass)")
  ax.axvline(SUPERVISION_STEPS, color="grey", ls=":", lw=1, label="trained supervision steps")
  ax.set(xlabel="test-time supervision steps", xticks=range(1, EVAL_STEPS + 1),
         ylabel="exact-solve accuracy (mean +- std over seeds)",
         title="4x4 Sudoku: accuracy vs test-time supervision steps")
  ax.legend(fontsize=8)
  sweep.save_figure(fig, root / "accuracy_vs_steps.png")
