"""Universal Transformer with adaptive halting (ACT) on algorithmic length generalization.

Copy and reverse (Dehghani et al. 2018, section 3.4): train on lengths 1..20, test on
1..20 (``test``) and on 21..40 (``test_long``). The model is the Universal Transformer of
experiments/ut_length_generalization.py (the same COMMON settings: 4+4-layer
encoder-decoder, d_model 64, 2 heads, d_ff 256, sinusoidal positions, no dropout, 2000
steps of 32 examples at lr 2e-3, each side one layer, M = 1) with ACT on
(``model.act.enabled``: threshold 0.99, ponder weight 0.01, halting bias 1.0, position +
step coordinates before every step): each position applies its side's layer 1..4 times.
The fixed-depth Universal Transformer and the vanilla one on the same tasks, settings and
budget are experiments/ut_length_generalization.py's runs (not re-run here). Two seeds
each. Results: experiments/results/ut_act/README.md.

    python -m launch.sweep --experiment=experiments/ut_act.py --workdir=/tmp/ut_act \
        --parallel=2
"""

from xlps import sweep

BASE = "configs/ut_algorithmic.py:copy"
COMMON = {"model.d_model": 64, "model.num_heads": 2, "model.d_ff": 256, "model.num_layers": 4,
          "model.dropout_rate": 0.0, "train.num_steps": 2000, "train.decay_steps": 2000,
          "train.batch_size": 32, "train.learning_rate": 2e-3, "train.warmup_steps": 100,
          "train.log_every_steps": 50, "train.eval_every_steps": 500,
          "train.checkpoint_every_steps": 2000, "data.num_eval_examples": 512,
          "data.eval_batches": 0}

ACT = {"model.sharing.num_unique": 1, "model.act.enabled": True}


def get_grid() -> list[dict]:
  tasks = [{"data.task": t} for t in ("copy", "reverse")]
  return sweep.product(tasks, [ACT], sweep.seeds(0, 1))
