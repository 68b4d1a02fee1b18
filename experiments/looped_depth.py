"""Looped depth beyond training (Huginn, Geiping et al. 2025): randomized vs fixed depth.

A byte-level decoder LM with a looped shape (prelude 1 layer, core 2 layers iterated up to
8 times, coda 1 layer: model.num_layers = 1 + 2 x 8 + 1 = 18), the prelude output
re-injected at every iteration through Huginn's adapter (Dense over [state, e]), core
state started at zeros. Trained with core iterations per step either
(i) randomized, Huginn's Poisson-lognormal draw (``poisson_lognormal``) with
mean_iterations 2 (expected draw 2.97 after clipping to 1..8: Huginn's draw has mean
mean_iterations + 1), (ii) fixed at 2, or (iii) randomized with mean_iterations 1, whose
expected draw is 2.00, the fixed model's training depth (the control for (i)'s extra
average depth); gradients through all iterations. All are evaluated at 1, 2, 3, 4, 6 and 8
core iterations (up to 4x the training mean of 2; train.eval_iterations ->
eval_loss_iter{r}). d_model 64, 2 heads, d_ff 128 (SwiGLU), pre-LN RMSNorm; 600 steps of
16 x 64 bytes of the stdlib corpus; two seeds. Results:
experiments/results/looped_depth/README.md.

    python -m launch.sweep --experiment=experiments/looped_depth.py \
        --workdir=/tmp/looped_depth --parallel=2

At the end (and with ``--collect_only``) ``report`` writes eval_depth.csv (one row per point
and depth, from the final eval_loss_iter{r} in results.csv), eval_depth.md (mean +- std
over seeds) and loss_vs_eval_depth.png into the sweep's workdir.
"""

import statistics

from xlps import sweep

MAX_ITERATIONS = 8
TRAIN_MEAN = 2
EVAL_ITERATIONS = (1, 2, 3, 4, 6, 8)

BASE = "configs/default.py:runlocal"   # d_model 64, 2 heads, d_ff 128, SwiGLU, RMSNorm, pre-LN
COMMON = {"train.num_steps": 600, "train.decay_steps": 600, "train.batch_size": 16,
          "data.seq_len": 64, "model.max_len": 64, "train.learning_rate": 3e-3,
          "train.warmup_steps": 30, "train.log_every_steps": 25, "train.eval_every_steps": 600,
          "train.checkpoint_every_steps": 600, "data.eval_batches": 16,
          "model.num_layers": 1 + 2 * MAX_ITERATIONS + 1,
          "model.loop.prelude": 1, "model.loop.core": 2, "model.loop.coda": 1,
          "model.loop.inject": "adapter", "model.loop.init_state": "zeros",
          "model.loop.backprop_iterations": 0,
          "train.eval_iterations": ",".join(map(str, EVAL_ITERATIONS))}
# (train_iterations, mean_iterations) -> the label in the tables and the plot
MODES = {("poisson_lognormal", 2): "randomized, mean_iterations 2 (E[draw] 2.97)",
         ("fixed", 2): "fixed 2",
         ("poisson_lognormal", 1): "randomized, mean_iterations 1 (E[draw] 2.00)"}


def get_grid() -> list[dict]:
  modes = [{"model.loop.train_iterations": t, "model.loop.mean_iterations": m}
           for t, m in MODES]
  return sweep.product(modes, sweep.seeds(0, 1))


def report(root, rows: list[dict]) -> None:
  """eval_depth.csv (one row per finished point and evaluation depth: its final
  eval_loss_iter{r}), eval_depth.md (mean +- std over seeds) and loss_vs_eval_depth.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [{"train_iterations": row["model.loop.train_iterations"],
           "mean_iterations": row["model.loop.mean_iterations"], "seed": row["seed"],
           "eval_iterations": r, "step": row["steps"],
           "eval_loss": row[f"final_eval_loss_iter{r}"]}
          for row in rows for r in EVAL_ITERATIONS]
  sweep.write_csv(root / "eval_depth.csv", rows)
  stats = {}
  for mode in MODES:
    for r in EVAL_ITERATIONS:
      values = [row["eval_loss"] for row in rows if row["eval_iterations"] == r
                and (row["train_iterations"], row["mean_iterations"]) == mode]
      if values:
        stats[mode, r] = (statistics.fmean(values),
                          statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
  lines = ["| eval iterations | " + " | ".join(MODES.values()) + " |",
           "|---|" + "---|" * len(MODES)]
  for r in EVAL_ITERATIONS:
    cells = [f"{stats[m, r][0]:.4f} +- {stats[m, r][1]:.4f}" if (m, r) in stats else ""
             for m in MODES]
    lines.append(f"| {r} | " + " | ".join(cells) + " |")
  (root / "eval_depth.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for i, mode in enumerate(MODES):
    depths = [r for r in EVAL_ITERATIONS if (mode, r) in stats]
    seeds = max(stats[mode, r][2] for r in depths)
    ax.errorbar([r + (i - 1) * 0.08 for r in depths], [stats[mode, r][0] for r in depths],
                yerr=[stats[mode, r][1] for r in depths], marker="o", capsize=3,
                label=f"{MODES[mode]}, {seeds} seeds")
  ax.axvline(TRAIN_MEAN, color="grey", ls="--", lw=1,
             label=f"training mean ({TRAIN_MEAN}; fixed and mean_iterations 1)")
  ax.axvline(2.97, color="C0", ls=":", lw=1, label="training mean of mean_iterations 2 (2.97)")
  ax.set(xlabel="core iterations at evaluation", xticks=EVAL_ITERATIONS,
         ylabel="final eval loss, nats/byte (mean +- std over seeds)",
         title="looped LM: eval loss vs evaluation depth")
  ax.legend(fontsize=8)
  sweep.save_figure(fig, root / "loss_vs_eval_depth.png")
