"""Recursify a trained model: M shared slots looped over its N layers, optionally with
per-applied-layer LoRA initialised from each layer's residual (``xlps.recursify``).

    # an xlps workdir (its latest checkpoint) or an HF BERT / ALBERT save_pretrained directory
    python -m launch.recursify --from=/tmp/lm_unshared --num_unique=3 --order=cycle \
        --init=average --lora_rank=16 --lora_init=svd --workdir=/tmp/lm_rec3
    # continue training it (the command the tool prints; add --config.KEY=VALUE overrides)
    python -m launch.train --config=configs/workdir.py:/tmp/lm_rec3 --workdir=/tmp/lm_rec3

The new workdir holds a step-0 checkpoint (the recursified weights, a fresh optimizer state
and data order) and its ``config.json``: the source's config with the new sharing plan and
LoRA settings.
"""

import sys

from absl import app, flags, logging

from xlps import config as config_lib
from xlps import recursify

_FROM = flags.DEFINE_string("from", None, "Source: an xlps workdir or an HF BERT/ALBERT directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "New (empty) workdir for the recursive model.")
_NUM_UNIQUE = flags.DEFINE_integer("num_unique", None, "M: unique slots of every component.")
_ORDER = flags.DEFINE_enum("order", "cycle", recursify.ORDERS, "Sharing order of the slots.")
_INIT = flags.DEFINE_enum("init", "average", recursify.INITS,
                          "Slot initialisation from the source layers.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "Per-applied-layer LoRA rank; 0 = none.")
_LORA_INIT = flags.DEFINE_enum("lora_init", "svd", recursify.LORA_INITS,
                               "svd: truncated SVD of each layer's residual; zero: B = 0.")
_LORA_BIAS = flags.DEFINE_bool("lora_bias", True,
                               "With LoRA, also a per-layer bias offset (the bias residual).")
_LORA_TARGETS = flags.DEFINE_string("lora_targets", None,
                                    "Projections with adapters (default: model.lora.targets).")
_UNSHARED_NORMS = flags.DEFINE_bool("unshared_norms", False,
                                    "Keep one set of norms per applied layer.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from xlps import interop
  from xlps import train
  try:
    workdir = interop.check_new_workdir(_WORKDIR.value)
    config, params = recursify.load_source(_FROM.value)
    config, params = recursify.recursify(
        config, params, _NUM_UNIQUE.value, _ORDER.value, _INIT.value, _LORA_RANK.value,
        _LORA_INIT.value, _LORA_BIAS.value, _LORA_TARGETS.value, _UNSHARED_NORMS.value,
        config.seed)
    print(interop.write_workdir(config, params, workdir))
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["from", "workdir", "num_unique"])
  app.run(main)
