"""Thin wrapper over Orbax ``CheckpointManager`` for ``WORKDIR/checkpoints``.

One checkpoint is a composite of three items:

* ``state``: the train state pytree (params, optimizer state, step, RNG key), restored
  against an abstract target (``jax.ShapeDtypeStruct`` with shardings), so it can land on
  a different mesh than it was saved from;
* ``data``: the data iterator's state (JSON), so batches continue exactly;
* ``metadata``: JSON with the config, the sharing plan and package versions.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash or SIGKILL during a save leaves the previous checkpoint intact; unfinished
directories are ignored when listing steps.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "tensorflow-datasets", "ml-collections", "xlps")


def package_versions() -> dict[str, str]:
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


class Checkpointer:
  """Saves and restores ``(state, data_state, metadata)`` under ``directory``."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               async_save: bool = True):
    path = epath.Path(directory)  # gs://... stays remote (pathlib would make it gs:/...)
    self.directory = path if "://" in os.fspath(directory) else path.absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, metadata: dict) -> None:
    """Starts a (possibly async) save of ``step``; the caller decides when to save."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        metadata=ocp.args.JsonSave(metadata)), force=True)

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, Any, dict]:
    """Restores step ``step`` onto the shardings carried by ``abstract_state``.

    Without ``abstract_state`` the state comes back as a tree of dicts on one device,
    whatever topology saved it: for inspection and conversion tools.
    """
    if abstract_state is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_state = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          self._manager.item_metadata(step)["state"],
          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        metadata=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["metadata"]

  def metadata(self, step: int) -> dict:
    """Only the JSON metadata of ``step`` (config, slots, versions): no arrays are read."""
    return self._manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))["metadata"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
