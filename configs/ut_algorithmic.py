"""Universal Transformer (no ACT) on the algorithmic tasks: copy, reverse, addition.

An encoder-decoder whose encoder applies one layer N times and whose decoder applies one
layer N times (Dehghani et al. 2018, without adaptive halting). The training split has
lengths 1..20; ``test_long`` has 21..40, so exact-sequence accuracy on it measures length
generalization.

    python -m launch.train --config=configs/ut_algorithmic.py:reverse --workdir=/tmp/ut_reverse
    python -m launch.train --config=configs/ut_algorithmic.py:addition,unshared \
        --workdir=/tmp/vanilla_addition

Argument: the task (``copy``, ``reverse``, ``addition``), plus ``unshared`` for the
vanilla Transformer baseline (M = N) and ``runlocal`` for a quick CPU check.
"""

import ml_collections

from xlps import config as config_lib

TASKS = ("copy", "reverse", "addition")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, task="copy", unshared=False, runlocal=False)
  if arg.task not in TASKS:
    raise ValueError(f"configs/ut_algorithmic.py task {arg.task!r} is unknown; valid: "
                     f"{', '.join(TASKS)}")
  config = config_lib.base_config()
  m = config.model
  m.family = "encoder_decoder"
  m.vocab_size = 260                   # bytes + specials
  m.d_model = 128
  m.num_heads = 4
  m.d_ff = 512
  m.num_layers = 6
  m.activation = "relu"
  m.norm_position = "pre"
  m.position_embedding = "sinusoidal"  # extrapolates to the longer test split
  m.scale_embeddings = True            # x sqrt(d_model), as Vaswani et al.: tokens vs positions
  m.max_len = 128
  m.dropout_rate = 0.1
  n = m.num_layers
  m.sharing = config_lib.sharing_config(num_unique=n if arg.unshared else 1, order="sequence")

  config.data.name = "algorithmic"
  config.data.task = arg.task
  config.data.seq_len = 96             # long enough for test_long (40 digits + separators)

  t = config.train
  t.num_steps = 3000
  t.batch_size = 64
  t.learning_rate = 1e-3
  t.warmup_steps = 200
  t.log_every_steps = 100
  t.eval_every_steps = 500
  t.checkpoint_every_steps = 500
  if arg.runlocal:
    m.d_model, m.num_heads, m.d_ff, m.num_layers = 64, 2, 128, 2
    m.sharing = config_lib.sharing_config(num_unique=2 if arg.unshared else 1,
                                          order="sequence")
    t.num_steps, t.batch_size, t.log_every_steps, t.warmup_steps = 50, 16, 10, 10
    t.eval_every_steps = t.checkpoint_every_steps = 50
  return config
