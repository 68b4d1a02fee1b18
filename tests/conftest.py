"""Test setup: 8 fake CPU devices (set before jax is imported) and float32 matmuls."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir shared by all xdist workers of a run (preparation is atomic)."""
  path = tmp_path_factory.getbasetemp().parent / "tfds"
  path.mkdir(exist_ok=True)
  return path
