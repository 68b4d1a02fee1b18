"""Workdir files: metrics are recorded once per step across resumes; remote workdirs:
gs:// paths reach the object store, never a local ``gs:`` folder.

An in-memory fsspec filesystem stands in for Google Cloud Storage (no network): epath
serves gs:// through fsspec when TensorFlow is absent, as on these machines.
"""

import os

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from helpers import records, tensorboard_steps
from launch import train as launch_train
from xlps import checkpoint as checkpoint_lib
from xlps import metrics, train


class FakeGCS(MemoryFileSystem):
  """A bucket store in memory, reached as gs://."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's keyword
    super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  # Orbax asks the real GCS API whether the bucket has a hierarchical namespace.
  monkeypatch.setattr("orbax.checkpoint._src.path.gcs_utils.is_hierarchical_namespace_enabled",
                      lambda path: False)
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  monkeypatch.chdir(tmp_path)  # a wrongly local "gs:" folder would appear here
  yield FakeGCS()
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path became a local folder"


def test_metrics_tensorboard_and_plot_reach_the_bucket(fake_gcs):
  workdir = train.workdir_path("gs://bucket/run")
  train._check_workdir(workdir)
  writer = metrics.MetricWriter(workdir)
  history = [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5, "eval_loss": 2.7}]
  for record in history:
    writer.write(record["step"], {k: v for k, v in record.items() if k != "step"})
  writer.close()
  launch_train.plot_losses(history, workdir / "loss.png", baseline=3.1)
  lines = fake_gcs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()
  assert [line.startswith('{"step": ') for line in lines] == [True, True]
  events = fake_gcs.ls("gs://bucket/run/tensorboard", detail=False)
  assert len(events) == 1 and "events.out.tfevents" in events[0]
  assert fake_gcs.size(events[0]) > 100
  assert fake_gcs.cat("gs://bucket/run/loss.png")[:4] == b"\x89PNG"
  # A second writer (a run resumed at step 2) keeps the earlier lines: object stores cannot
  # append.
  writer = metrics.MetricWriter(workdir, start_step=2)
  writer.write(3, {"train_loss": 2.0})
  writer.close()
  assert len(fake_gcs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()) == 3


def test_a_resumed_writer_records_each_step_once(tmp_path):
  """Rows a killed run wrote past its last checkpoint (and a torn last line) are dropped,
  and TensorBoard is rewritten from the rows kept."""
  writer = metrics.MetricWriter(epath.Path(tmp_path))
  for step in range(1, 6):
    writer.write(step, {"train_loss": 1.0 / step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train_lo')
  writer = metrics.MetricWriter(epath.Path(tmp_path), start_step=3)
  assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
  writer.write(4, {"train_loss": 0.2})
  writer.close()
  assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4]
  assert tensorboard_steps(tmp_path) == {"train_loss": [1, 2, 3, 4]}


def test_checkpoint_directory_stays_remote(fake_gcs):
  ckpt = checkpoint_lib.Checkpointer(train.workdir_path("gs://bucket/run") / "checkpoints",
                                     async_save=False)
  assert os.fspath(ckpt.directory) == "gs://bucket/run/checkpoints"
  assert ckpt.latest_step() is None
  ckpt.close()
  assert fake_gcs.isdir("gs://bucket/run/checkpoints")  # Orbax created it in the bucket


def test_unsupported_scheme_is_refused_before_any_work(tmp_path, data_dir):
  from configs import default
  config = default.get_config("tied,runlocal")
  config.data.data_dir = str(data_dir)
  with pytest.raises(ValueError, match=r"workdir='hdfs://x/run': the scheme 'hdfs://' is not "
                                       r"supported; use a local path or one of gs://"):
    train.train_and_evaluate(config, "hdfs://x/run")
