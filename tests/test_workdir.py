"""Workdir files: metrics are recorded once per step across resumes; remote workdirs:
gs:// paths reach the object store, never a local ``gs:`` folder.

An in-memory fsspec filesystem stands in for Google Cloud Storage (no network): epath
serves gs:// through fsspec when TensorFlow is absent, as on these machines.
"""

import json
import os
import subprocess
import sys

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from helpers import ROOT, records, tensorboard_steps
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
  lines = fake_gcs.cat("gs://bucket/run/metrics-00000.jsonl").decode().splitlines()
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
  assert [r["step"] for r in metrics.read_records(workdir)] == [1, 2, 3]


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


@pytest.mark.slow
def test_gs_workdir_without_the_gcs_extra_is_one_line_naming_the_extra(tmp_path):
  """Every launch entry point that takes a workdir (or a workdir's config) stops on gs://
  without gcsfs with one line naming the ``gcs`` extra and its install command, no trace."""
  stub = tmp_path / "stub" / "gcsfs"  # gcsfs absent, whatever this machine has installed
  stub.mkdir(parents=True)
  (stub / "__init__.py").write_text("raise ImportError(\"No module named 'gcsfs'\")\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(tmp_path / "stub"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
  gs, local = "gs://bucket/run", str(tmp_path / "local")
  commands = {
      "train": ["launch.train", "--config=configs/default.py:tied,runlocal", f"--workdir={gs}"],
      "train, configs/workdir.py": ["launch.train", f"--config=configs/workdir.py:{gs}",
                                    f"--workdir={local}"],
      "summary, configs/workdir.py": ["launch.summary", f"--config=configs/workdir.py:{gs}"],
      "generate": ["launch.generate", f"--workdir={gs}", "--prompt=a"],
      "convert --hf_out": ["launch.convert", f"--workdir={gs}", f"--hf_out={local}"],
      "convert --hf": ["launch.convert", f"--hf={local}", f"--workdir={gs}"],
      "recursify --from": ["launch.recursify", f"--from={gs}", f"--workdir={local}",
                           "--num_unique=2"],
      "recursify --workdir": ["launch.recursify", f"--from={local}", f"--workdir={gs}",
                              "--num_unique=2"],
  }
  procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, args in commands.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, stderr[-2000:])
    assert lines[0].startswith("error: ") and "gcs extra" in lines[0], (name, lines[0])
    assert "pip install 'xlps[gcs]'" in lines[0], (name, lines[0])


def test_object_store_metrics_are_uploaded_in_bounded_chunks(fake_gcs, monkeypatch, tmp_path):
  """On gs:// each record uploads a bounded number of bytes (metrics parts and TensorBoard
  event files rotate at PART_BYTES), not the whole history; readers see every row once,
  also after a resume that drops the rows past its checkpoint."""
  uploaded = [0]  # bytes written to the bucket

  def counting_write(self, data, write=MemoryFile.write):
    uploaded[0] += len(data)
    return write(self, data)

  monkeypatch.setattr(MemoryFile, "write", counting_write)
  monkeypatch.setattr(metrics.MetricWriter, "PART_BYTES", 4096, raising=False)
  workdir = train.workdir_path("gs://bucket/run")
  train._check_workdir(workdir)

  def row(step):
    return {f"metric_{i}": step + i / 10 for i in range(8)}

  writer = metrics.MetricWriter(workdir)
  uploads = []
  for step in range(1, 301):
    before = uploaded[0]
    writer.write(step, row(step))
    uploads.append(uploaded[0] - before)
  writer.close()
  assert max(uploads) <= 2 * 4096 + 2048, (uploads[:3], uploads[-3:])
  expected = [{"step": step, **row(step)} for step in range(1, 301)]
  assert metrics.read_records(workdir) == expected
  local = tmp_path / "copy"
  fake_gcs.get("gs://bucket/run/tensorboard", str(local / "tensorboard"), recursive=True)
  assert len(list((local / "tensorboard").iterdir())) > 1  # rotated
  assert tensorboard_steps(local) == {f"metric_{i}": list(range(1, 301)) for i in range(8)}

  writer = metrics.MetricWriter(workdir, start_step=123)  # a run resumed at step 123
  for step in range(124, 131):
    writer.write(step, row(step))
  writer.close()
  assert metrics.read_records(workdir) == expected[:130]
  local = tmp_path / "copy_after_resume"
  fake_gcs.get("gs://bucket/run/tensorboard", str(local / "tensorboard"), recursive=True)
  assert tensorboard_steps(local) == {f"metric_{i}": list(range(1, 131)) for i in range(8)}


def test_metrics_files_of_earlier_versions_and_copied_runs_keep_every_row(fake_gcs, tmp_path):
  """A bucket run with the single metrics.jsonl of an earlier version goes on in parts after
  it; a bucket run copied to a local disk is folded back into one metrics.jsonl."""
  workdir = train.workdir_path("gs://bucket/run")
  fake_gcs.pipe("gs://bucket/run/metrics.jsonl",
                b"".join(b'{"step": %d, "train_loss": 1.0}\n' % s for s in range(1, 6)))
  writer = metrics.MetricWriter(workdir, start_step=3)
  writer.write(4, {"train_loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics.read_records(workdir)] == [1, 2, 3, 4]
  assert fake_gcs.cat("gs://bucket/run/metrics.jsonl").count(b"\n") == 3
  local = tmp_path / "local_copy"
  fake_gcs.get("gs://bucket/run/", str(local), recursive=True)
  writer = metrics.MetricWriter(epath.Path(local), start_step=4)
  writer.write(5, {"train_loss": 0.4})
  writer.close()
  assert [r["step"] for r in records(local)] == [1, 2, 3, 4, 5]
  assert metrics.metric_files(local) == [epath.Path(local) / "metrics.jsonl"]


def hold_lock(workdir, holder: str = "pid 4242 on host elsewhere") -> int:
  """Takes the workdir's lock as another run would (an open file with an exclusive flock);
  returns the file descriptor (closing it releases the lock)."""
  import fcntl
  workdir.mkdir(parents=True, exist_ok=True)
  fd = os.open(workdir / "xlps.lock", os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  os.write(fd, json.dumps({"pid": 4242, "host": "elsewhere", "what": "launch.train",
                           "since": "2026-01-01T00:00:00Z"}).encode())
  return fd


@pytest.mark.slow
def test_a_second_run_in_a_workdir_is_refused_naming_the_first(tmp_path, data_dir):
  """Two runs in one workdir would both train and write every metrics row twice: the second
  stops before any work with one line naming the process that holds the workdir."""
  from configs import default
  config = default.get_config("tied,runlocal")
  config.data.data_dir = str(data_dir)
  config.train.update(num_steps=2, decay_steps=2, warmup_steps=1, log_every_steps=1,
                      eval_every_steps=2, checkpoint_every_steps=2)
  fd = hold_lock(tmp_path / "wd")
  try:
    with pytest.raises(train.ConfigError, match=r"workdir='.*/wd' is in use by launch.train "
                                                r"\(pid 4242 on host elsewhere, since "
                                                r"2026-01-01T00:00:00Z\)"):
      train.train_and_evaluate(config, tmp_path / "wd")
  finally:
    os.close(fd)
  assert not (tmp_path / "wd" / "checkpoints").exists()
  train.train_and_evaluate(config, tmp_path / "wd")  # released: the run goes ahead
  assert [r["step"] for r in records(tmp_path / "wd")] == [1, 2]


def test_object_store_workdirs_are_not_locked_and_say_so(caplog):
  from xlps import workdir_lock
  with caplog.at_level("WARNING"), workdir_lock.hold("gs://bucket/run", "launch.train"):
    pass
  assert "is not locked against a second run (an object store has no file locks)" in caplog.text
