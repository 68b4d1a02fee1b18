"""The config a workdir was made with: fine-tune a converted checkpoint, or reuse a run's.

    python -m launch.convert --hf=/path/to/albert --workdir=/tmp/albert_ft
    python -m launch.train --config=configs/workdir.py:/tmp/albert_ft --workdir=/tmp/albert_ft \
        --config.train.num_steps=1000 --config.train.learning_rate=1e-4

The argument is the workdir. Its ``config.json`` (written by ``launch.convert``) is read
if present, else the config stored with the latest checkpoint in ``WORKDIR/checkpoints``.
The saved values are set onto ``xlps.config.base_config()``, so every key keeps its type
and ``--config.KEY=VALUE`` overrides work as with any other config file (placeholder keys
such as ``model.sharing.mlp.num_unique`` included).
"""

import json

import ml_collections
from etils import epath

from xlps import config as config_lib
from xlps import storage
from xlps.config import ConfigError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ConfigError("configs/workdir.py needs the workdir as its argument: "
                      "--config=configs/workdir.py:WORKDIR")
  storage.check_filesystem(arg)
  return config_lib.from_saved(saved_config(epath.Path(arg)))


def saved_config(workdir: epath.Path) -> dict:
  """``WORKDIR/config.json``, else the config in the metadata of the newest checkpoint that
  verifies (``Checkpointer.newest_metadata``).

  ``workdir`` may be remote (``gs://...``), as for ``launch.train``.
  """
  path = workdir / "config.json"
  if path.is_file():
    try:
      return json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON ({e})") from None
  checkpoints = workdir / "checkpoints"
  if checkpoints.is_dir():
    from xlps import checkpoint as checkpoint_lib  # Orbax, only when there is no config.json
    ckpt = checkpoint_lib.Checkpointer(checkpoints, async_save=False)
    try:
      newest = ckpt.newest_metadata()  # a damaged newer step is reported and skipped
      if newest is not None:
        return newest[1]["config"]
    finally:
      ckpt.close()
  raise ConfigError(f"workdir {str(workdir)!r} has neither config.json nor a checkpoint in "
                    f"{checkpoints}; pass a workdir written by `python -m launch.convert --hf=... "
                    "--workdir=WORKDIR` or by `python -m launch.train`")
