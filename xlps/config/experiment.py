"""A whole experiment config: ``base_config`` (every section at its defaults), saved configs
read back (``from_saved``, ``upgrade_saved_model``), and ``validate``, which checks every
section and every cross-section constraint."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from xlps.config.checks import ConfigError, check_int, then_valid
from xlps.config.data import BYTE_VOCAB_SIZE, check_data, data_config
from xlps.config.mesh import MESH_AXES, check_mesh, mesh_config, mesh_shape
from xlps.config.model import ModelSpec, model_config
from xlps.config.train import check_train, eval_iterations, train_config


def base_config() -> ml_collections.ConfigDict:
  """A full experiment config with every section at its defaults (configs/ start here)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                  # init, dropout and data-order seed
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  config.mesh = mesh_config()
  return config


# Model keys renamed since runs were saved (old -> new name in the same section).
RENAMED_MODEL_KEYS = {"act.update": "update_rule"}
# Model keys whose default changed: a saved section without them ran with these values.
SAVED_BEFORE_DEFAULTS = {"act.update_rule": "interpolate", "routing.gating": "interpolate"}


def upgrade_saved_model(model: Mapping) -> dict:
  """A saved ``config.model`` in today's keys: renamed keys moved, and keys whose default
  changed since set to the value the run was trained with (a section without them)."""
  model = {k: dict(v) if isinstance(v, Mapping) else v for k, v in model.items()}
  for old, new in RENAMED_MODEL_KEYS.items():
    section, key = old.split(".")
    if isinstance(model.get(section), dict) and key in model[section]:
      model[section][new] = model[section].pop(key)
  for path, value in SAVED_BEFORE_DEFAULTS.items():
    section, key = path.split(".")
    if isinstance(model.get(section), dict):
      model[section].setdefault(key, value)
  return model


def from_saved(values: Mapping) -> ml_collections.ConfigDict:
  """``base_config()`` with a saved config's ``values`` set key by key (checkpoint metadata,
  ``config.json``): keys saved before they existed keep their defaults (or, where a default
  changed, the value the run had: ``upgrade_saved_model``), types stay the schema's, and a
  saved key the schema lacks is a ConfigError naming it."""
  if isinstance(values.get("model"), Mapping):
    values = {**values, "model": upgrade_saved_model(values["model"])}
  config = base_config()
  _set_saved(config, values, prefix="")
  return config


def _set_saved(node: ml_collections.ConfigDict, values: Mapping, prefix: str) -> None:
  for key, value in values.items():
    name = prefix + key
    if key not in node:
      raise ConfigError(f"saved config key {name} is not an xlps config key; valid keys "
                        f"here: {', '.join(sorted(node))}")
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"saved config key {name}={value!r} must be a section (a JSON object)")
      _set_saved(node[key], value, prefix=f"{name}.")
      continue
    try:
      node[key] = value
    except TypeError as e:
      raise ConfigError(f"saved config key {name}={value!r}: {e}") from None


def validate(config: ml_collections.ConfigDict, process_count: int = 1,
             num_devices: int | None = None) -> ModelSpec:
  """Checks every section and every cross-section constraint; returns the model spec.

  Runs before any data is read or anything traced. ``num_devices`` defaults to
  ``jax.device_count()`` (imported only then).
  """
  sections = ("seed", "model", "data", "train", "mesh")
  for key in config:
    if key not in sections:
      raise ConfigError(f"{key} is not a config section{then_valid(key, sections)}valid: "
                        f"{', '.join(sections)}")
  check_int("seed", config.seed, 0)
  spec = ModelSpec.from_config(config.model)
  check_train(config.train)
  check_data(config, 0, process_count)
  d = config.data
  if spec.position_embedding != "none" and d.seq_len > spec.max_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={spec.max_len}: positions "
                      f"beyond max_len have no embedding; set model.max_len >= {d.seq_len} or "
                      f"data.seq_len <= {spec.max_len}")
  vocab = None  # data.tokenizer='file': known once loaded (xlps.data checks it then)
  if d.tokenizer == "byte":
    vocab = BYTE_VOCAB_SIZE
  elif d.tokenizer == "sentencepiece":
    vocab = d.sp_vocab_size
  if vocab is not None and vocab > spec.vocab_size:
    raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the {d.tokenizer} "
                      f"tokenizer's vocabulary ({vocab}); set model.vocab_size >= {vocab}")
  eval_iterations(config.train, spec)
  check_mesh(config.mesh)
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  shape = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  batch_shards = shape["data"] * shape["fsdp"]
  if config.train.batch_size % batch_shards:
    raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the "
                      f"mesh's data x fsdp = {shape['data']} x {shape['fsdp']} = {batch_shards} "
                      "batch shards")
  return spec
