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

Every save also writes ``<step>/xlps_checksums.json``: the size and SHA-256 of each file of
the three items, computed by process 0 after Orbax has written them and before it commits
the step (Orbax's post-finalization callback), so the checksums commit with the step.

Resuming (``Checkpointer.restore_latest``) checks a checkpoint before using it: every JSON
file must parse, every byte range the array database (OCDBT) points at must exist, every
file must match its checksum (checkpoints written before checksums existed skip this), and
the restored state must be finite (training never saves NaN/Inf, so a non-finite value is
corruption that even the checksums of an older checkpoint could not catch). A damaged
checkpoint is reported (step and file), moved aside to ``<step>.damaged-<UTC time>`` (not a
step name: Orbax no longer lists it, and a new save of that step does not collide with it)
and the previous one is used; if none can be restored, ``CheckpointError`` lists what is
wrong with each and nothing is moved. Read-only tools (``launch.generate``, conversion,
``configs/workdir.py``) fall back the same way but leave the damaged step in place.
Checkpoints of another model than the config describes (``RESUMABLE_MODEL_KEYS`` aside) are
refused before anything is restored (``ModelMismatchError``), or with
``on_mismatch='restart'`` the whole directory is moved aside to
``checkpoints.mismatch-<UTC time>`` and the run starts at step 0.

Retention: the ``max_to_keep`` newest checkpoints plus every step that is a multiple of
``keep_every_steps`` (Orbax preservation policies). Orbax deletes older steps only after
the new one has committed (``CheckpointManager._finalize``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from xlps import config as config_lib
from xlps.config import ConfigError

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "tensorflow-datasets", "ml-collections", "xlps")

ITEMS = ("state", "data", "metadata")  # the composite's items (subdirectories of a step)
# Model keys that may change when a run continues: regularisation, the init of parameters
# that already exist, the compute dtype, the attention kernel and how depth is traced or
# rematerialised change neither the parameters nor what they mean; nor do a looped model's
# iteration counts (its parameters and LoRA / routers are sized by num_layers), its early
# exit or the weights of auxiliary losses. Every other model key must match.
RESUMABLE_MODEL_KEYS = ("dropout_rate", "attention_dropout_rate", "attention_impl", "init_std",
                        "dtype", "scan_layers", "remat_policy", "remat_group_size",
                        "loop.train_iterations", "loop.mean_iterations",
                        "loop.backprop_iterations", "loop.eval_iterations",
                        "loop.exit_threshold", "act.ponder_weight", "routing.aux_weight",
                        "routing.balance_weight", "routing.z_weight")
# Orbax lists only directories named like a step (``^(0|[1-9]\d*)$``, no temporary suffix),
# so these names are out of its way: ``8.damaged-20260101T120000Z``,
# ``checkpoints.mismatch-20260101T120000Z``.
DAMAGED_INFIX = ".damaged-"
MISMATCH_INFIX = ".mismatch-"
TMP_MARK = ".orbax-checkpoint-tmp"  # a save that never committed (Orbax ignores it)
CHECKSUMS = "xlps_checksums.json"  # in each step directory: {"files": {path: {size, sha256}}}
# Orbax bookkeeping that it may rewrite after a step is written: not checksummed.
UNCHECKED = ("_CHECKPOINT_METADATA", "commit_success.txt")


class CheckpointError(ConfigError):
  """No checkpoint in the directory can be restored (the message lists each one's problem).

  A ConfigError so that ``launch/`` prints the message without a traceback."""


class ModelMismatchError(ConfigError):
  """The checkpoints hold another model than the config describes."""

  def __init__(self, message: str, differences: list[str]):
    super().__init__(message)
    self.differences = differences


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
               keep_every_steps: int = 0, async_save: bool = True):
    """Keeps the ``max_to_keep`` newest checkpoints (None: all) plus every one whose step is
    a multiple of ``keep_every_steps`` (0: none)."""
    path = epath.Path(directory)  # gs://... stays remote (pathlib would make it gs:/...)
    self.directory = path if "://" in os.fspath(directory) else path.absolute()
    if "preservation_policy" in {f.name for f in dataclasses.fields(ocp.CheckpointManagerOptions)}:
      policies = ocp.checkpoint_managers
      keep = policies.LatestN(max_to_keep)
      if keep_every_steps:
        keep = policies.AnyPreservationPolicy([keep, policies.EveryNSteps(keep_every_steps)])
      retention = {"preservation_policy": keep}
    else:  # orbax-checkpoint before preservation policies: the same two rules
      retention = {"max_to_keep": max_to_keep, "keep_period": keep_every_steps or None}
    # Always Orbax's async checkpointer: its post-finalization callback writes the checksums
    # into the step before the commit; ``async_save=False`` waits for each save instead.
    self._async = async_save
    self._saving: int | None = None  # the step whose save is in flight
    self._options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums),
        **retention)
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=self._options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, metadata: dict) -> None:
    """Starts a (possibly async) save of ``step``; the caller decides when to save."""
    self._manager.wait_until_finished()  # one save in flight: ``_saving`` names it
    self._saving = step
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        metadata=ocp.args.JsonSave(metadata)), force=True)
    if not self._async:
      self._manager.wait_until_finished()

  def _write_checksums(self) -> None:
    """Orbax's post-finalization callback: the items of step ``_saving`` are written and
    not yet committed (renamed from ``<step>.orbax-checkpoint-tmp-*``; on object stores,
    where Orbax writes in place and commits with a marker file, the step's own directory)."""
    if jax.process_index() != 0:
      return
    step = self._saving
    pending = sorted(p for p in self.directory.iterdir()
                     if p.name.startswith(f"{step}{TMP_MARK}"))
    root = pending[-1] if pending else self.step_path(step)
    files = {name: {"size": size, "sha256": digest}
             for name, (size, digest) in _file_digests(root).items()}
    tmp = root / f"{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    tmp.rename(root / CHECKSUMS)

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

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)  # Orbax's standard step name (no prefix, no padding)

  def verify(self, step: int) -> list[str]:
    """What is wrong with the files of checkpoint ``step``; empty when nothing is found.

    Every JSON file must parse, and every byte range the state's array database (OCDBT)
    points at must exist: its b-tree nodes are walked (``tensorstore.ocdbt.dump``). Process
    0 then reads every file the step's checksum file lists and compares its size and SHA-256
    (a step without one, written before checksums existed, skips this; its restored state
    is still checked for NaN/Inf by the callers that restore).
    """
    root, problems = self.step_path(step), []

    def json_file(path: epath.Path, required: bool = True) -> Any:
      if not path.exists():
        if required:
          problems.append(f"{path} is missing")
        return None
      try:
        return json.loads(path.read_text())
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        problems.append(f"{path} is truncated or corrupt (not valid JSON: {e})")
        return None

    json_file(root / "_CHECKPOINT_METADATA", required=False)  # Orbax's step metadata
    missing = [item for item in ITEMS if not (root / item).is_dir()]
    problems += [f"{root / item} is missing" for item in missing]
    for item in ("data", "metadata"):
      if item not in missing:
        json_file(root / item / "metadata")  # JsonCheckpointHandler's file name
    if "state" not in missing:
      state = root / "state"
      tree = json_file(state / "_METADATA")
      json_file(state / "_sharding", required=False)
      if (state / "array_metadatas").is_dir():
        for path in sorted((state / "array_metadatas").iterdir()):
          json_file(path)
      if not isinstance(tree, dict) or tree.get("use_ocdbt", True):
        problems += _ocdbt_problems(state)
    if jax.process_index() == 0 and (root / CHECKSUMS).exists():
      written = json_file(root / CHECKSUMS)
      if isinstance(written, dict):
        problems += _checksum_problems(root, written.get("files", {}))
    return problems

  def restore_latest(self, abstract_state: Any, *, model: Any = None,
                     on_mismatch: str = "refuse",
                     move_aside: bool = True) -> tuple[int, Any, Any, dict] | None:
    """The newest intact checkpoint as ``(step, state, data_state, metadata)``, or None.

    Newest first, each checkpoint is verified (``verify``), restored and checked for NaN/Inf
    (``nonfinite_arrays``); a damaged one is skipped with a warning naming its step and
    file, and once an older one has restored, each damaged newer one is moved aside to
    ``<step>.damaged-<UTC time>`` (never deleted; ``move_aside=False``, for read-only
    tools: left in place). If none restores, ``CheckpointError`` lists every problem and
    nothing is moved. ``abstract_state=None`` restores as ``restore`` does without one.

    With ``model`` (the run's model config), the stored ``metadata["config"]["model"]`` of
    the checkpoint about to be restored is compared first (``model_differences``); if it
    differs, ``on_mismatch='refuse'`` raises ``ModelMismatchError`` naming every field, and
    ``'restart'`` moves the whole directory aside to ``<dir>.mismatch-<UTC time>`` and
    returns None (start at step 0). Nothing is restored before the comparison.
    """
    self._report_uncommitted()
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      metadata, problem = self._verified_metadata(step)
      if self._is_damaged(step, problem, damaged):
        continue
      if model is not None and self._check_model(step, metadata, model, on_mismatch):
        return None  # on_mismatch='restart' moved the checkpoints aside
      restored, problem = self._restored(step, abstract_state)
      if self._is_damaged(step, problem, damaged):
        continue
      for bad, why in damaged:
        if not move_aside:
          logging.warning("Checkpoint step %d in %s is damaged: %s. Left it in place (the next "
                          "launch.train run moves it aside); using step %d.",
                          bad, self.directory, why, step)
          continue
        aside = self._move_aside(self.step_path(bad), DAMAGED_INFIX)
        logging.warning(
            "Checkpoint step %d in %s is damaged: %s. Moved it aside to %s (a name Orbax does "
            "not list as a step; nothing was deleted). Resuming from step %d.",
            bad, self.directory, why, aside, step)
      if damaged and move_aside:
        self._manager.reload()
      return (step, *restored)
    if damaged:
      lines = "\n".join(f"  step {bad}: {why}" for bad, why in damaged)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored (nothing was moved or "
          f"deleted):\n{lines}\nRepair the files, move the damaged step directories aside (to "
          f"any name that is not a number, e.g. {damaged[0][0]}{DAMAGED_INFIX}manual), or use "
          "another --workdir to start afresh.")
    return None

  def restore_checked(self, step: int, abstract_state: Any = None) -> tuple[Any, Any, dict]:
    """``restore(step, abstract_state)`` after the checks of ``restore_latest``, for a step
    asked for by name: a damaged one raises ``CheckpointError`` naming what is wrong."""
    if step not in self.all_steps():
      raise CheckpointError(f"{self.directory} holds no checkpoint step {step} (steps: "
                            f"{self.all_steps()})")
    problem = "; ".join(self.verify(step))
    restored = None
    if not problem:
      restored, problem = self._restored(step, abstract_state)
    problem = self._agree(problem, step)
    if problem:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged (nothing "
                            f"was moved or deleted):\n  step {step}: {problem}")
    return restored

  def newest_metadata(self) -> tuple[int, dict] | None:
    """``(step, metadata)`` of the newest checkpoint that verifies and whose metadata reads
    (no arrays are restored), each newer one reported and left in place; None without
    checkpoints; ``CheckpointError`` when none is intact."""
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      metadata, problem = self._verified_metadata(step)
      if self._is_damaged(step, problem, damaged):
        continue
      for bad, why in damaged:
        logging.warning("Checkpoint step %d in %s is damaged: %s. Left it in place; using "
                        "step %d.", bad, self.directory, why, step)
      return step, metadata
    if damaged:
      lines = "\n".join(f"  step {bad}: {why}" for bad, why in damaged)
      raise CheckpointError(f"no checkpoint in {self.directory} can be read:\n{lines}")
    return None

  def _restored(self, step: int, abstract_state: Any) -> tuple[tuple | None, str]:
    """``((state, data_state, metadata), "")``, or ``(None, problem)`` when the arrays cannot
    be read or hold NaN/Inf."""
    try:
      restored = self.restore(step, abstract_state)
    except Exception as e:  # noqa: BLE001 - any failure to read the arrays is damage here
      return None, f"{self.step_path(step)} cannot be restored ({_one_line(e)})"
    bad = nonfinite_arrays(restored[0])
    if bad:
      more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
      return None, (f"{self.step_path(step)} restored with NaN/Inf in {', '.join(bad[:5])}"
                    f"{more} (training never saves non-finite values: its files are corrupt)")
    return restored, ""

  def _verified_metadata(self, step: int) -> tuple[dict | None, str]:
    """``(metadata, problem)`` of ``step``: its files verified, then its metadata read."""
    problem = "; ".join(self.verify(step))
    if problem:
      return None, problem
    try:
      return self.metadata(step), ""
    except Exception as e:  # noqa: BLE001 - verify found nothing, reading still failed
      return None, f"{self.step_path(step) / 'metadata'} cannot be read ({_one_line(e)})"

  def _is_damaged(self, step: int, problem: str, damaged: list[tuple[int, str]]) -> bool:
    """Whether any process found ``problem`` with ``step`` (then logged and collected)."""
    problem = self._agree(problem, step)
    if problem:
      logging.info("Checkpoint step %d is damaged, trying the previous one: %s", step, problem)
      damaged.append((step, problem))
    return bool(problem)

  def _check_model(self, step: int, metadata: dict, model: Any, on_mismatch: str) -> bool:
    """Raises ModelMismatchError, or True once on_mismatch='restart' moved all aside."""
    saved = (metadata.get("config") or {}).get("model") if isinstance(metadata, dict) else None
    if not isinstance(saved, Mapping):
      logging.warning("Checkpoint step %d stores no model config; the model is not compared",
                      step)
      return False
    differences = model_differences(saved, model)
    if not differences:
      return False
    fields = "\n".join(f"  {d}" for d in differences)
    if on_mismatch == "restart":
      aside = self._move_all_aside()
      logging.warning(
          "The checkpoints in %s (step %d) hold another model than the config:\n%s\n"
          "train.on_mismatch=restart: moved them aside to %s; starting at step 0.",
          self.directory, step, fields, aside)
      return True
    raise ModelMismatchError(
        f"the checkpoints in {self.directory} (step {step}) hold another model than the "
        f"config describes:\n{fields}\nNothing was restored. Use another --workdir for "
        "this config, or pass --config.train.on_mismatch=restart to move these checkpoints "
        f"aside (to {self.directory.name}{MISMATCH_INFIX}<UTC time>) and start at step 0.",
        differences)

  def _report_uncommitted(self) -> None:
    if self.directory.exists():
      for path in sorted(self.directory.iterdir()):
        if TMP_MARK in path.name:
          logging.warning("Ignoring %s: a save that never committed (Orbax renames a step's "
                          "temporary directory only when the save is complete)", path)

  def _agree(self, problem: str, step: int) -> str:
    """``problem``, or one when another process found one: every process skips alike."""
    if jax.process_count() == 1:
      return problem
    if multihost_utils.process_allgather(np.int32(bool(problem))).any() and not problem:
      return f"{self.step_path(step)} failed to verify or restore on another process"
    return problem

  def _move_aside(self, path: epath.Path, infix: str) -> epath.Path:
    """Renames ``path`` to a free ``<name><infix><UTC time>`` next to it (one process)."""
    target = _aside_name(path, infix)
    if jax.process_index() == 0:
      path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"xlps checkpoint move {path}")
    return target

  def _move_all_aside(self) -> epath.Path:
    self._manager.close()
    target = self._move_aside(self.directory, MISMATCH_INFIX)
    self._manager = self._make_manager()  # creates an empty directory again
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def nonfinite_arrays(tree: Any) -> list[str]:
  """The paths (``params/mlp/wi_up/kernel``) of the floating-point arrays of ``tree`` that
  hold NaN or Inf; one jitted reduction per array (sharded arrays stay where they are)."""
  leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
            if np.issubdtype(x.dtype, np.inexact)]
  finite = jax.device_get(_all_finite_each([x for _, x in leaves]))
  return ["/".join(_key_name(k) for k in path)
          for (path, _), ok in zip(leaves, finite) if not ok]


@jax.jit
def _all_finite_each(arrays: list) -> list:
  return [jax.numpy.isfinite(x).all() for x in arrays]


def _key_name(key: Any) -> str:
  for field in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _file_digests(root: epath.Path) -> dict[str, tuple[int, str]]:
  """``{relative path: (size, SHA-256)}`` of every file of the items under ``root`` but
  Orbax's bookkeeping (``UNCHECKED``)."""
  digests = {}
  pending = [root / item for item in ITEMS]
  while pending:
    path = pending.pop()
    if path.is_dir():
      pending.extend(path.iterdir())
    elif path.name not in UNCHECKED and path.exists():
      digests[os.fspath(path)[len(os.fspath(root)) + 1:]] = _digest(path)
  return digests


def _digest(path: epath.Path) -> tuple[int, str]:
  hasher, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      hasher.update(chunk)
      size += len(chunk)
  return size, hasher.hexdigest()


def _checksum_problems(root: epath.Path, files: Mapping[str, Mapping]) -> list[str]:
  """Each file of ``files`` (``CHECKSUMS``) under ``root`` that is missing or differs."""
  problems = []
  for name, expected in sorted(files.items()):
    path = root / name
    if not path.exists():
      problems.append(f"{path} is missing (listed in {CHECKSUMS})")
      continue
    size, digest = _digest(path)
    if (size, digest) != (expected.get("size"), expected.get("sha256")):
      problems.append(f"{path} does not match its checksum ({size} bytes, sha256 "
                      f"{digest[:12]}...; written {expected.get('size')} bytes, sha256 "
                      f"{str(expected.get('sha256'))[:12]}...)")
  return problems


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def model_differences(saved: Mapping, current: Any) -> list[str]:
  """``model.KEY: checkpoint A, config B`` for every model key (sharing plan keys included)
  in which the stored model config ``saved`` and ``current`` differ, RESUMABLE_MODEL_KEYS
  aside.

  Keys the checkpoint lacks (written before they existed) count as their defaults; a
  derived value counts as what it resolves to (``embed_dim=0`` is ``d_model``); sharing and
  kv_sharing keys that differ count only if the slot or K/V entry tables they give differ
  (``order`` is moot with M=1).
  """
  defaults = _flatten(_as_dict(config_lib.model_config()))
  old = {**defaults, **_flatten(config_lib.upgrade_saved_model(saved))}
  new = {**defaults, **_flatten(_as_dict(current))}
  old_spec, new_spec = _resolved(old), _resolved(new)
  resolved = old_spec is not None and new_spec is not None
  differences = []
  for key, value in new.items():
    if resumable(key) or old.get(key) == value:
      continue
    section = key.split(".")[0]
    if resolved and key.startswith(("sharing.", "kv_sharing.")):
      if _slot_tables(old_spec) == _slot_tables(new_spec):
        continue
    elif resolved and section in ("act", "loop", "lora", "routing") and "." in key:
      if getattr(old_spec, section) == getattr(new_spec, section):
        continue  # e.g. both off: the section's keys are moot
    elif resolved and hasattr(new_spec, key) and getattr(old_spec, key) == getattr(new_spec, key):
      continue
    differences.append(f"model.{key}: checkpoint {old.get(key)!r}, config {value!r}")
  return differences


def resumable(key: str) -> bool:
  """Whether model key ``key`` (dotted, without ``model.``) may change on resume."""
  return key in RESUMABLE_MODEL_KEYS or key.split(".")[0] in RESUMABLE_MODEL_KEYS


def resumable_changes(saved: Mapping | None, current: Any) -> list[str]:
  """``model.KEY: checkpoint A, config B`` for each RESUMABLE_MODEL_KEYS key in which the
  stored model config ``saved`` (None: not stored) and ``current`` differ: what a resumed
  run changes."""
  if not isinstance(saved, Mapping):
    return []
  defaults = _flatten(_as_dict(config_lib.model_config()))
  old = {**defaults, **_flatten(saved)}
  new = {**defaults, **_flatten(_as_dict(current))}
  return [f"model.{key}: checkpoint {old.get(key)!r}, config {value!r}"
          for key, value in new.items() if resumable(key) and old.get(key) != value]


def _as_dict(model: Any) -> dict:
  if hasattr(model, "to_json_best_effort"):  # a ConfigDict, as stored (checkpoint_metadata)
    return json.loads(model.to_json_best_effort())
  return json.loads(json.dumps(model))


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _resolved(flat: Mapping[str, Any]) -> config_lib.ModelSpec | None:
  """The ModelSpec of a flat model config, or None if this code cannot validate it."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  try:
    return config_lib.ModelSpec.from_config(tree)
  except (ValueError, TypeError, KeyError, AttributeError):
    return None


def _slot_tables(spec: config_lib.ModelSpec) -> tuple:
  return tuple((stack.name, stack.owner, tuple((comp, group, plan.num_unique, plan.slots)
                                               for comp, group, plan in stack.uses),
                stack.kv.entries if stack.kv else None)
               for stack in spec.stacks)


def _one_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _aside_name(path: epath.Path, infix: str) -> epath.Path:
  """A free sibling ``<name><infix><UTC time>`` (``-1``, ``-2``, ... if taken)."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  target, n = path.parent / f"{path.name}{infix}{stamp}", 0
  while target.exists():
    n += 1
    target = path.parent / f"{path.name}{infix}{stamp}-{n}"
  return target


def _ocdbt_problems(item: epath.Path) -> list[str]:
  """Missing or truncated files of the OCDBT database in ``item`` (e.g. ``<step>/state``).

  Walks the manifest's latest version: every b-tree node and every out-of-line value is a
  location ``kind:base:relative_path:offset:length``; its file must hold ``offset+length``
  bytes. Reads the manifest and the b-tree nodes only.
  """
  manifest = item / "manifest.ocdbt"
  if not manifest.exists():
    return [f"{manifest} is missing"]
  url = os.fspath(item)
  url = (url if "://" in url else "file://" + url).rstrip("/") + "/"
  try:
    kvstore = ts.KvStore.open(url).result()
    versions = ts.ocdbt.dump(kvstore).result().get("versions") or []
  except Exception as e:  # noqa: BLE001 - tensorstore raises ValueError with a status text
    return [f"{manifest} cannot be read ({_one_line(e)})"]
  sizes: dict[str, int | None] = {}
  problems: list[str] = []
  reported: set[str] = set()  # one report per file

  def locations(tree: Any):
    if isinstance(tree, str) and tree.startswith(("btreenode:", "value:")):
      yield tree
    elif isinstance(tree, Mapping):
      for value in tree.values():
        yield from locations(value)
    elif isinstance(tree, list):
      for value in tree:
        yield from locations(value)

  def check(location: str) -> bool:
    head, offset, length = location.rsplit(":", 2)
    _, base, relative = head.split(":", 2)
    path = item.joinpath(*(p.strip("/") for p in (base, relative) if p.strip("/")))
    key = os.fspath(path)
    if key not in sizes:
      sizes[key] = path.stat().length if path.exists() else None
    need = int(offset) + int(length)
    if sizes[key] is not None and sizes[key] >= need:
      return True
    if key not in reported:
      reported.add(key)
      problems.append(f"{path} is missing (the array index points into it)" if sizes[key] is None
                      else f"{path} is truncated ({sizes[key]} bytes; the array index points at "
                           f"bytes up to {need})")
    return False

  pending = list(locations(versions[-1])) if versions else []
  while pending:
    location = pending.pop()
    if not check(location) or not location.startswith("btreenode:"):
      continue
    try:
      pending.extend(locations(ts.ocdbt.dump(kvstore, location).result()))
    except Exception as e:  # noqa: BLE001
      problems.append(f"{location} cannot be read ({_one_line(e)})")
  return problems
