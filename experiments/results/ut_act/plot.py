"""act_vs_fixed.png: train loss and ACT's train ponder vs step, ACT UT beside the earlier
study's fixed-depth UT and vanilla runs (same tasks, settings, budget) and the ponder-weight-0
ACT diagnostic (seed 0; README).

    python experiments/results/ut_act/plot.py /tmp/ut_act_v2 /tmp/ut_length_generalization \
        /tmp/ut_act_tau0 experiments/results/ut_act/act_vs_fixed.png
"""

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xlps import metrics  # noqa: E402

MODELS = (("ACT UT (max 4 steps)", "act", "num_unique=1,enabled=True", "tab:green"),
          ("ACT UT, ponder weight 0", "tau0", "num_unique=1,enabled=True,ponder_weight=0.0",
           "tab:red"),
          ("fixed-depth UT (4 steps)", "old", "num_unique=1", "tab:blue"),
          ("vanilla (4 layers)", "old", "num_unique=4", "tab:orange"))


def rows(workdir: pathlib.Path) -> list[dict]:
  return [r for r in metrics.read_records(workdir) if "train_loss" in r]


def main(act_root: str, old_root: str, tau0_root: str, out: str) -> None:
  roots = {"act": pathlib.Path(act_root), "old": pathlib.Path(old_root),
           "tau0": pathlib.Path(tau0_root)}
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True,
                           gridspec_kw={"height_ratios": [2, 1]})
  for col, task in enumerate(("copy", "reverse")):
    ax, pax = axes[0, col], axes[1, col]
    for label, root, name, colour in MODELS:
      for seed, style in ((0, "-"), (1, "--")):
        workdir = roots[root] / f"task={task},{name},seed={seed}"
        if not workdir.exists():  # the diagnostic ran seed 0 only
          continue
        r = rows(workdir)
        steps = [x["step"] for x in r]
        ax.plot(steps, [x["train_loss"] for x in r], style, color=colour, lw=1.2,
                label=f"{label}, seed {seed}")
        if "train_ponder" in r[0]:
          note = ", pads incl. (1da1715)" if root == "tau0" else ""
          pax.plot(steps, [x["train_ponder"] for x in r], style, color=colour, lw=1.2,
                   label=f"{label}, seed {seed}{note}")
    ax.set(title=task, ylabel="train loss (nats/token)", yscale="log")
    pax.set(xlabel="step", ylabel="ACT train ponder\n(N+R, enc + dec)", ylim=(3.5, 10.5))
    pax.axhline(4.0, color="grey", lw=0.8, ls=":")
    pax.annotate("4 = one step per stack (N = 1, R = 1); at most 10", (0, 4.0), fontsize=7,
                 xytext=(40, 3), textcoords="offset points", color="grey")
    pax.legend(fontsize=7)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)


if __name__ == "__main__":
  main(*sys.argv[1:])
