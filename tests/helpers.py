"""Shared test helpers."""

import json
import pathlib

import ml_collections

from xlps import config as config_lib


def tiny(family: str = "decoder_lm", num_layers: int = 6, **overrides) -> ml_collections.ConfigDict:
  """A tiny model config (vocab 32, d_model 16, 4 heads, seq 8) with overrides.

  ``sharing={"num_unique": 2, "mlp": {"num_unique": 3}}`` sets plan keys; a dict value
  overrides that component's plan.
  """
  m = config_lib.model_config()
  m.family = family
  m.vocab_size, m.d_model, m.num_heads, m.d_ff, m.max_len = 32, 16, 4, 32, 8
  m.num_layers = num_layers
  sharing = overrides.pop("sharing", {})
  for key, value in overrides.items():
    m[key] = value
  for key, value in sharing.items():
    if isinstance(value, dict):
      m.sharing[key].update(value)
    else:
      m.sharing[key] = value
  return m


def logged_losses(workdir) -> dict[int, float]:
  """step -> train_loss from metrics.jsonl, the last record of each step (a restarted run
  re-logs the steps after its last checkpoint)."""
  out = {}
  for record in records(workdir):
    if "train_loss" in record:
      out[record["step"]] = record["train_loss"]
  return out


def records(workdir) -> list[dict]:
  """Every record of metrics.jsonl in order."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]
