"""Recursive-depth byte LMs on the stdlib corpus: middle-cycle sharing, relaxed (per-layer
LoRA) recursion, and Mixture-of-Recursions routing (Bae et al. 2025).

The model is ``configs/default.py``'s decoder LM (d_model 128, 4 heads, SwiGLU, RMSNorm).

    python -m launch.train --config=configs/recursive.py:relaxed --workdir=/tmp/relaxed
    python -m launch.train --config=configs/recursive.py:mor_expert,runlocal --workdir=/tmp/mor
    python -m launch.summary --config=configs/recursive.py:mor_token

Variants:
* ``middle_cycle``: N = 8 applied layers, M = 4 slots ``0 1 2 1 2 1 2 3`` (the first and
  last layers unshared, MoR's best layout);
* ``relaxed``: N = 6, M = 3 in cycle order plus a rank-8 LoRA (and bias offsets) per applied
  layer (Relaxed Recursive Transformers; ``launch.recursify`` makes one from a trained
  unshared model);
* ``mor_expert`` / ``mor_token``: middle-cycle as a looped core (prelude 1 layer, core 2
  layers x 3 recursions, coda 1 layer: N = 8) with expert-choice routing (capacities 1,
  2/3, 1/3 of the positions) or token-choice routing;
* ``runlocal`` shrinks the model for quick CPU debugging.
"""

import ml_collections

from xlps import config as config_lib

from configs import default

VARIANTS = ("middle_cycle", "relaxed", "mor_expert", "mor_token")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="middle_cycle", runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f"configs/recursive.py variant {arg.variant!r} is unknown; valid: "
                     f"{', '.join(VARIANTS)}")
  config = default.get_config("runlocal" if arg.runlocal else None)
  m = config.model
  if arg.variant == "middle_cycle":
    m.num_layers = 8
    m.sharing = config_lib.sharing_config(num_unique=4, order="middle_cycle")
  elif arg.variant == "relaxed":
    m.sharing = config_lib.sharing_config(num_unique=3, order="cycle")
    m.lora.rank, m.lora.bias = 8, True
  else:
    m.num_layers = 1 + 2 * 3 + 1
    m.sharing = config_lib.sharing_config()
    m.loop.prelude, m.loop.core, m.loop.coda = 1, 2, 1
    m.routing.kind = "expert_choice" if arg.variant == "mor_expert" else "token_choice"
  return config
