"""The sharded-run setup of bench/sharding.py and tests/test_partitioning.py: a mesh of
named axes over the first devices, its rules, the jitted steps and random LM batches."""

import math

import jax
import ml_collections
import numpy as np

from xlps import config as config_lib
from xlps import models, partitioning, train


def mesh_config(**axes: int) -> ml_collections.ConfigDict:
  """A mesh config of ``axes`` (e.g. ``fsdp=8``); every other axis has size 1."""
  cfg = config_lib.mesh_config()
  cfg.data, cfg.fsdp, cfg.tensor = 1, 1, 1
  cfg.update(axes)
  return cfg


def sharded_steps(config, train_config: ml_collections.ConfigDict, axes: dict) -> train.Steps:
  """``train.make_steps`` of ``config`` (full or model) with ``train_config``'s optimizer on
  a mesh of ``axes`` over the first devices it needs."""
  cfg = mesh_config(**axes)
  mesh = partitioning.make_mesh(cfg, jax.devices()[:math.prod(axes.values())])
  return train.make_steps(models.spec_of(config), train.make_optimizer(train_config), 0, mesh,
                          partitioning.rules_of(cfg))


def lm_batch(rng: np.random.Generator, batch_size: int, length: int, low: int,
             high: int) -> dict[str, np.ndarray]:
  """A decoder_lm host batch of random tokens in [low, high): next-token targets, unit weights."""
  x = rng.integers(low, high, (batch_size, length + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:],
          "weights": np.ones((batch_size, length), np.float32)}
