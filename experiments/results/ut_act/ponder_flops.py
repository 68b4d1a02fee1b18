"""Per-stack ACT ponder and applied FLOPs of finished ut_act points (teacher-forced eval).

    python experiments/results/ut_act/ponder_flops.py /tmp/ut_act_v2/task=* /tmp/ut_act_tau0/task=* \
        > experiments/results/ut_act/ponder_flops.csv

For each workdir (its latest checkpoint) and each eval split (``test``: lengths 1..20,
``test_long``: 21..40), runs the model as the eval loop does (deterministic, teacher-forced)
and reads each stack's sown ``intermediates/.../ponder`` = N(t) + R(t) per position. N(t),
the layer applications of position t, is ``ceil(ponder) - 1`` (R is in [0.01, 1]). Means are
over real positions (encoder: non-pad source tokens; decoder: target positions with weight,
EOS included). To check against the logged ``eval_ponder`` (summed over both stacks, each a
per-batch mean averaged over batches): ``logged_style_ponder_non_pad`` averages over the
non-pad positions (encoder: source != 0, decoder: target != 0), what the training loss and
the logs average since b30dc10; ``logged_style_ponder_all_positions`` averages over all
positions of the padded rows, pads included, what they averaged before (at 1da1715).

Applied FLOPs per target token follow ``models.summarize`` at data.seq_len (as the sweep's
``flops_per_token`` column does): ``flops_per_token - sum over stacks of (N - mean N(t)) x
layer_flops_per_token[stack]``. The masked scan still runs all N = 4 steps; this counts
what a position applies (a halted position's frozen state is still attended to).
"""

import csv
import sys

import jax
import numpy as np

from xlps import data, interop, models


def stack_ponders(intermediates) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    if "ponder" in keys:
      stack = "encoder" if any("encoder" in str(k) for k in keys) else "decoder"
      out[stack] = np.asarray(leaf)
  return out


def main(workdirs):
  writer = None
  for workdir in workdirs:
    config, params, step = interop.read_checkpoint(workdir)
    spec = models.spec_of(config)
    model = models.build(spec)
    summary = models.summarize(spec, config.data.seq_len)
    layer = summary["adaptive_depth"]["layer_flops_per_token"]
    pipeline = data.build(config)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True,
                                             mutable=["losses", "intermediates"]))
    for split in ("test", "test_long"):
      sums = {k: 0.0 for k in ("enc_p", "enc_n", "enc_real", "dec_p", "dec_n", "dec_real",
                               "all_p", "valid_p", "batches")}
      for batch in pipeline.eval_batches(split):
        _, aux = apply(params, {k: batch[k] for k in ("inputs", "targets")})
        ponder = stack_ponders(aux["intermediates"])
        assert set(ponder) == {"encoder", "decoder"}, list(ponder)
        masks = {"enc": batch["inputs"] != 0, "dec": batch["weights"] > 0}
        valid = {"enc": batch["inputs"] != 0, "dec": batch["targets"] != 0}
        for short, stack in (("enc", "encoder"), ("dec", "decoder")):
          p, m = ponder[stack], masks[short]
          sums[f"{short}_p"] += float((p * m).sum())
          sums[f"{short}_n"] += float(((np.ceil(p - 1e-4) - 1) * m).sum())
          sums[f"{short}_real"] += float(m.sum())
          sums["all_p"] += float(p.mean())
          sums["valid_p"] += float((p * valid[short]).sum() / max(valid[short].sum(), 1))
        sums["batches"] += 1
      row = {"workdir": workdir.rstrip("/").split("/")[-1], "step": step, "split": split}
      for short in ("enc", "dec"):
        row[f"{short}_ponder"] = sums[f"{short}_p"] / sums[f"{short}_real"]
        row[f"{short}_steps"] = sums[f"{short}_n"] / sums[f"{short}_real"]
      row["logged_style_ponder_non_pad"] = sums["valid_p"] / sums["batches"]
      row["logged_style_ponder_all_positions"] = sums["all_p"] / sums["batches"]
      n = spec.num_layers
      row["flops_per_token_fixed"] = summary["flops_per_token"]
      row["applied_flops_per_token"] = summary["flops_per_token"] - sum(
          (n - row[f"{short}_steps"]) * layer[stack]
          for short, stack in (("enc", "encoder"), ("dec", "decoder")))
      row["layer_flops_encoder"], row["layer_flops_decoder"] = layer["encoder"], layer["decoder"]
      if writer is None:
        writer = csv.DictWriter(sys.stdout, list(row))
        writer.writeheader()
      writer.writerow(row)
      sys.stdout.flush()


if __name__ == "__main__":
  main(sys.argv[1:])
