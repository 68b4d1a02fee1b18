"""Universal Transformer with adaptive halting (ACT) on algorithmic length generalization.

Copy and reverse (Dehghani et al. 2018, section 3.4): train on lengths 1..20, test on
1..20 (``test``) and on 21..40 (``test_long``). The model is the Universal Transformer of
experiments/ut_length_generalization.py (the same COMMON settings: 4+4-layer
encoder-decoder, d_model 64, 2 heads, d_ff 256, sinusoidal positions, no dropout, 2000
steps of 32 examples at lr 2e-3, each side one layer, M = 1) with ACT on
(``model.act.enabled``: threshold 0.99, ponder weight 0.01, halting bias 1.0, position +
step coordinates before every step, Scenic's interpolating update, which was the default
when this study ran; the default is now the UT paper's effective rule, ``accumulate``):
each position applies its side's layer 1..4 times.
The fixed-depth Universal Transformer and the vanilla one on the same tasks, settings and
budget are experiments/ut_length_generalization.py's runs (not re-run here), whose BASE and
COMMON this file imports. Run it from the repository root, as BASE's config path
requires: the import then resolves there too. Two seeds each. Results:
experiments/results/ut_act/README.md.

    python -m launch.sweep --experiment=experiments/ut_act.py --workdir=/tmp/ut_act_v2 \
        --parallel=2
"""

from experiments.ut_length_generalization import BASE, COMMON  # the same base and settings
from xlps import sweep

ACT = {"model.sharing.num_unique": 1, "model.act.enabled": True,
       "model.act.update_rule": "interpolate"}


def get_grid() -> list[dict]:
  tasks = [{"data.task": t} for t in ("copy", "reverse")]
  return sweep.product(tasks, [ACT], sweep.seeds(0, 1))
