"""Do checkpoints written by an older revision continue bitwise-identically with this tree?

For each config: the OLD revision (a temporary ``git worktree``) trains 20 steps
uninterrupted (the reference) and, separately, 10 steps (its checkpoint); THIS tree resumes
a copy of the 10-step workdir to step 20. The final parameters must equal the reference's
bitwise. Dropout is on, so the dropout keys and the data order must continue exactly too.

    python -m bench.checkpoint_compat --old=e6d0b95
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
from absl import flags, logging

from bench import harness
from xlps.interop import read_checkpoint

_OLD = flags.DEFINE_string("old", "HEAD~1", "git revision that writes the checkpoints")
_ONLY = flags.DEFINE_list("only", [], "Configs to run (default: all of CONFIGS).")
CONFIGS = {"decoder_lm": "configs/default.py:cycle,runlocal",
           "encoder_mlm": "configs/albert.py:base,runlocal",
           "encoder_decoder_tied": "configs/transformer.py:tied,runlocal"}
ROOT = pathlib.Path(harness.ROOT)


def train(cwd: pathlib.Path, config: str, workdir: pathlib.Path, steps: int) -> None:
  flags_ = ["--config.train.decay_steps=20", "--config.train.checkpoint_every_steps=10",
            "--config.train.eval_every_steps=100", "--config.train.log_every_steps=5",
            "--config.train.async_checkpoints=False", "--config.model.dropout_rate=0.1",
            f"--config.train.num_steps={steps}"]
  # PYTHONPATH: the old tree's xlps wins over this tree's editable install.
  env = {**os.environ, "PYTHONPATH": str(cwd)}
  subprocess.run([sys.executable, "-m", "launch.train", f"--config={config}",
                  f"--workdir={workdir}", *flags_], cwd=cwd, env=env, check=True,
                 capture_output=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    old = tmp / "old"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), _OLD.value], cwd=ROOT,
                   check=True, capture_output=True)
    try:
      for name, config in CONFIGS.items():
        if _ONLY.value and name not in _ONLY.value:
          continue
        train(old, config, tmp / f"{name}_ref", 20)
        train(old, config, tmp / f"{name}_half", 10)
        shutil.copytree(tmp / f"{name}_half", tmp / f"{name}_cont")
        train(ROOT, config, tmp / f"{name}_cont", 20)
        _, ref, _ = read_checkpoint(tmp / f"{name}_ref")
        _, new, step = read_checkpoint(tmp / f"{name}_cont")
        assert jax.tree.structure(ref) == jax.tree.structure(new)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref),
                                                               jax.tree.leaves(new)))
        print(f"{name}: {_OLD.value} step-10 checkpoint continued here to step {step}: "
              f"{len(jax.tree.leaves(ref))} parameter arrays "
              f"{'bitwise equal' if diff == 0 else f'differ by up to {diff:.2e}'} "
              "vs the uninterrupted old run")
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)


if __name__ == "__main__":
  harness.run(main)
