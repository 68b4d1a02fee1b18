"""Gradient of the training objective (teacher-forced loss + ponder_weight x ponder) with
respect to the ACT halting units of a finished ut_act point, on the first ``test`` batch.

    python experiments/results/ut_act/halting_grad.py \
        '/tmp/ut_act_v2/task=reverse,num_unique=1,enabled=True,seed=0'

Prints, for each stack's halting unit, the largest absolute gradient entry and the
parameters. Zero means no position's loss depends on the halting probabilities: every
position halted at step 1 with remainder R = 1, a constant.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from xlps import data, interop, models, train


def main(workdir: str) -> None:
  config, params, _ = interop.read_checkpoint(workdir)
  spec = models.spec_of(config)
  model = models.build(spec)
  batch = next(data.build(config).eval_batches("test"))

  def objective(p):
    logits, extras = train.apply_model(model, p, batch, deterministic=True)
    loss, _ = train.loss_and_metrics(logits, batch["targets"], batch["weights"])
    return loss + spec.act.ponder_weight * extras["ponder"]

  grads = jax.grad(objective)(params)
  values = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "halting" in name:
      value = np.asarray(values[path])
      print(f"{name}: max |grad| {float(jnp.abs(leaf).max())}, norm {np.linalg.norm(value):.3f}")


if __name__ == "__main__":
  main(sys.argv[1])
