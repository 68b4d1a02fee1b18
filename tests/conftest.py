"""Test setup: 8 fake CPU devices (set before jax is imported) and float32 matmuls."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and the
# launch.* subprocesses they start (which inherit the environment): many tests compile the
# same small programs, and a cached executable loads in a fraction of the compile time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "xlps-test-jax-cache-"
    + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir shared by all xdist workers of a run (preparation is atomic)."""
  path = tmp_path_factory.getbasetemp().parent / "tfds"
  path.mkdir(exist_ok=True)
  return path
