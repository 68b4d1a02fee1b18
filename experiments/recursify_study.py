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
3e-3 as the source. Results: experiments/results/recursify/README.md.

    python -m launch.sweep --experiment=experiments/recursify_study.py \
        --workdir=/tmp/recursify_study --parallel=2

A recursified point runs ``launch.recursify`` from its seed's source point as a pre-step
(once the source is done), then ``launch.train`` from the converted step-0 checkpoint
(``--dry_run`` prints both). With --parallel equal to the cores, each point runs on one
core, so a re-run repeats it. ``report`` writes results.md (one row per kind, M, rank and
init: mean +- std over seeds) and loss_vs_unique_params.png from the finished points,
also with ``--collect_only``.
"""

from xlps import sweep

N = 6
SOURCE_STEPS, CONT_STEPS = 600, 300
NUM_UNIQUE = (3, 2)
RANKS = (0, 4, 16)
INITS = ("average", "stepwise", "lower")
SEEDS = (0, 1)
BASE = "configs/default.py:runlocal"   # the from-scratch points' shape
SOURCE = "configs/default.py:unshared,runlocal"
COMMON = {"train.batch_size": 16, "data.seq_len": 64, "model.max_len": 64,
          "train.warmup_steps": 30, "train.log_every_steps": 50, "data.eval_batches": 16}


def schedule(steps: int, lr: float) -> dict:
  return {"train.num_steps": steps, "train.decay_steps": steps, "train.learning_rate": lr,
          "train.eval_every_steps": steps, "train.checkpoint_every_steps": steps}


def get_grid() -> list[dict]:
  """Per seed: the source, the original (continued), every recursified model, scratch."""
  grid = []
  for seed in SEEDS:
    grid.append({"kind": "source", "M": N, "rank": 0, "seed": seed})
    grid.append({"kind": "original", "M": N, "rank": 0, "init": "lower", "seed": seed})
    grid += [{"kind": "recursified", "M": m, "rank": r, "init": init, "seed": seed}
             for m in NUM_UNIQUE for r in RANKS for init in INITS]
    grid += [{"kind": kind, "M": m, "rank": r, "seed": seed}
             for m in NUM_UNIQUE for r in RANKS for kind in ("scratch", "scratch_total")]
  return grid


def steps(point: dict, workdir, root) -> sweep.Steps:
  kind, seed, m, rank = point["kind"], point["seed"], point["M"], point["rank"]
  if kind == "source":
    return sweep.Steps(SOURCE, {"seed": seed, **schedule(SOURCE_STEPS, 3e-3)})
  if kind in ("scratch", "scratch_total"):
    model = {"model.num_layers": N, "model.sharing.num_unique": m,
             "model.sharing.order": "cycle", "model.lora.rank": rank,
             "model.lora.bias": rank > 0}
    budget = CONT_STEPS if kind == "scratch" else SOURCE_STEPS + CONT_STEPS
    return sweep.Steps(BASE, {"seed": seed, **model, **schedule(budget, 3e-3)})
  source = {"kind": "source", "M": N, "rank": 0, "seed": seed}
  order = "sequence" if kind == "original" else "cycle"
  recursify = ["launch.recursify", f"--from={root / sweep.point_name(source)}",
               f"--workdir={workdir}", f"--num_unique={m}", f"--order={order}",
               f"--init={point['init']}", f"--lora_rank={rank}", "--lora_init=svd"]
  # The seed is the source's, kept in the converted config.
  return sweep.Steps(f"configs/workdir.py:{workdir}", schedule(CONT_STEPS, 1e-3),
                     pre=[recursify], after=[source])


def _cell(group: dict) -> tuple:
  return group["kind"], group["M"], group["rank"], group.get("init") or ""


def report(root, rows: list[dict]) -> None:
  """results.md and loss_vs_unique_params.png (replacing the generic ones): final eval loss
  per kind, M, rank and init, mean +- std over seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = sweep.aggregate(rows)
  lines = ["| kind | M | LoRA rank | init | unique params | steps | eval loss (mean +- std) "
           "| seeds |", "|---|---|---|---|---|---|---|---|"]
  for g in groups:
    lines.append(f"| {g['kind']} | {g['M']} | {g['rank']} | {g.get('init') or '-'} "
                 f"| {g['unique_params']:,} | {g['steps']:.0f} | {g['final_eval_loss']:.4f} +- "
                 f"{g['final_eval_loss_std']:.4f} | {g['seeds']} |")
  (root / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, ax = plt.subplots(figsize=(9, 5))
  styles = {"source": ("k", "x"), "original": ("k", "*"), "recursified": (None, "o"),
            "scratch": ("grey", "s"), "scratch_total": ("grey", "D")}
  colors = {"average": "C0", "stepwise": "C1", "lower": "C2"}
  for g in sorted(groups, key=_cell):
    kind, m, rank, init = _cell(g)
    color, marker = styles[kind]
    label = kind + (f", init {init}" if kind == "recursified" else "")
    ax.errorbar(g["unique_params"], g["final_eval_loss"], yerr=g["final_eval_loss_std"],
                color=color or colors[init], marker=marker, capsize=3, ls="none", label=label)
    if init in ("", "stepwise"):  # one label per point group (the inits sit together)
      ax.annotate(f"M={m},r={rank}", (g["unique_params"], g["final_eval_loss"]), fontsize=6,
                  xytext=(4, 2), textcoords="offset points")
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1))
  ax.set(xscale="log", xlabel="unique parameters", ylabel="final eval loss, nats/byte",
         title=f"recursified (+{CONT_STEPS} steps) vs from scratch, N = {N}")
  sweep.save_figure(fig, root / "loss_vs_unique_params.png")
