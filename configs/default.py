"""Weight-tied decoder-only LM (Universal-Transformer style: one layer applied N times).

    python -m launch.summary --config=configs/default.py
    python -m launch.summary --config=configs/default.py --config.model.num_layers=24 \
        --config.model.sharing.num_unique=3 --config.model.sharing.order=cycle_rev

Variants: ``tied`` (default, M = 1), ``unshared`` (M = N), ``cycle``, ``sequence``,
``cycle_rev`` (M = N / 2), ``runlocal`` shrinks the model for quick CPU debugging:
``--config=configs/default.py:cycle,runlocal``.
"""

import ml_collections

from xlps import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="tied", runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0                      # parameter init / dropout seed
  m = config_lib.model_config()
  m.family = "decoder_lm"
  m.vocab_size = 256                   # bytes
  m.d_model = 256
  m.num_heads = 4
  m.d_ff = 1024
  m.num_layers = 6
  m.max_len = 256
  m.norm = "rmsnorm"
  m.activation = "swiglu"
  m.position_embedding = "learned"
  if arg.variant == "tied":
    m.sharing = config_lib.sharing_config(num_unique=1)
  elif arg.variant == "unshared":
    m.sharing = config_lib.sharing_config(num_unique=m.num_layers, order="sequence")
  elif arg.variant in ("cycle", "sequence", "cycle_rev"):
    m.sharing = config_lib.sharing_config(num_unique=m.num_layers // 2, order=arg.variant)
  else:
    raise ValueError(f"configs/default.py variant {arg.variant!r} is unknown; valid: "
                     "tied, unshared, cycle, sequence, cycle_rev")
  if arg.runlocal:
    m.d_model, m.num_heads, m.d_ff, m.max_len = 64, 2, 128, 64
  config.model = m
  return config
