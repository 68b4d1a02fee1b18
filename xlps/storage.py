"""Object-store paths (gs://): a one-line error, before any work, when the filesystem that
serves them is not installed.

epath reaches gs:// through TensorFlow's gfile when TensorFlow is installed, else through
fsspec and gcsfs (the ``gcs`` extra, which also brings google-cloud-storage for Orbax).
Without either, the first file operation fails deep inside fsspec with a traceback.
"""

from __future__ import annotations

import importlib.util
import os

from xlps.config import ConfigError

GCS_INSTALL = "pip install 'xlps[gcs]'"


def check_filesystem(path: str | os.PathLike, what: str = "workdir") -> None:
  """ConfigError naming the ``gcs`` extra and its install command when ``path`` is on gs://
  and neither gcsfs (through fsspec) nor TensorFlow can serve it; local paths pass."""
  text = os.fspath(path)
  if not text.startswith("gs://") or importlib.util.find_spec("tensorflow") is not None:
    return
  import fsspec
  try:
    fsspec.get_filesystem_class("gcs")  # a registered implementation, or gcsfs importable
  except ImportError:
    raise ConfigError(f"{what}={text!r} is on Google Cloud Storage, which needs the gcs extra "
                      f"(gcsfs, google-cloud-storage): {GCS_INSTALL} (from a clone: pip "
                      "install -e '.[gcs]')") from None
