"""Converts Hugging Face ALBERT / BERT checkpoints to and from xlps training checkpoints.

    # HF save_pretrained directory -> WORKDIR/checkpoints (step 0) + WORKDIR/config.json
    # (+ WORKDIR/tokenizer: the directory's tokenizer files, or --tokenizer=PATH)
    python -m launch.convert --hf=/path/to/albert --workdir=/tmp/albert_ft \
        [--tokenizer=/path/to/spiece.model]
    # fine-tune it (the command the conversion prints; add --config.KEY=VALUE overrides)
    python -m launch.train --config=configs/workdir.py:/tmp/albert_ft --workdir=/tmp/albert_ft
    # latest checkpoint of WORKDIR -> HF directory (AlbertForMaskedLM / BertForMaskedLM)
    python -m launch.convert --workdir=/tmp/albert_ft --hf_out=/tmp/albert_hf \
        [--config=configs/albert.py:base]   # default: the config stored in the checkpoint

Training starts from the converted step-0 checkpoint: the converted weights, a fresh
optimizer state and a fresh data order, on the model's own tokenizer (a SentencePiece
``.model``, a ``tokenizer.json`` or the snapshot's tokenizer files; its vocabulary and
special ids are checked against the HF config). ``--hf_out`` writes the run's tokenizer
(``WORKDIR/tokenizer``) and its pad / BOS / EOS ids with the weights. The conversion starts from ``xlps.presets`` (the
ALBERT / BERT shapes ``configs/albert.py`` also uses); the printed command names
``configs/workdir.py``, so run it from the repository root.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from xlps import config as config_lib

_HF = flags.DEFINE_string("hf", None, "HF save_pretrained directory to convert into --workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "xlps workdir (checkpoints: WORKDIR/checkpoints).")
_HF_OUT = flags.DEFINE_string("hf_out", None, "Write WORKDIR's latest checkpoint here as HF.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "With --hf: the model's tokenizer (a "
                                 "SentencePiece .model, a tokenizer.json or an HF snapshot "
                                 "directory); default: the --hf directory's own.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --hf_out: the xlps config (default: the checkpoint's own).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_HF.value is None) == (_HF_OUT.value is None):
    raise app.UsageError("give exactly one of --hf (HF -> xlps) and --hf_out (xlps -> HF)")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  from xlps import data
  from xlps import interop
  from xlps import train
  from xlps.interop import huggingface
  try:
    workdir = train.workdir_path(_WORKDIR.value)
    if _HF.value is not None:
      if "://" not in _HF.value and not os.path.isdir(_HF.value):
        what = "is not a directory" if os.path.exists(_HF.value) else "does not exist"
        raise config_lib.ConfigError(f"--hf={_HF.value!r} {what}; valid: a Hugging Face "
                                     "save_pretrained directory (config.json and the weights)")
      workdir = interop.check_new_workdir(workdir)
      config, params = huggingface.load_hf(_HF.value, tokenizer=_TOKENIZER.value)
      print(interop.write_workdir(config, params, workdir))
    else:
      if _TOKENIZER.value is not None:
        raise app.UsageError("--tokenizer goes with --hf; --hf_out writes the run's tokenizer")
      config, params, step = interop.read_checkpoint(workdir)
      config = _CONFIG.value or config
      kept = (workdir / data.KEPT_TOKENIZER).exists()
      tokenizer = data.run_tokenizer(config, workdir) if kept else None
      out = huggingface.save_hf(config, params, _HF_OUT.value, tokenizer=tokenizer)
      print(f"wrote {out} from step {step} of {workdir / 'checkpoints'}")
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
