"""Bytes a run's metrics upload to an object store per record, against the run's length.

``MetricWriter`` on a gs:// workdir, with an in-memory fsspec filesystem standing in for
the bucket (no network); every byte written to it is counted. Each record has 12 scalars,
about the size of a train record.

    python -m bench.remote_metrics --records=100,1000,3000
"""

import os
import tempfile

import fsspec
from absl import flags
from etils import epath
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from bench import harness
from xlps import metrics

_RECORDS = flags.DEFINE_list("records", ["100", "1000", "3000"], "Run lengths in records.")


class _Bucket(MemoryFileSystem):
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's keyword
    super().__init__(*args, **kwargs)


def measure(records: int) -> tuple[int, int, int]:
  """(bytes uploaded by the last record, by all records, objects in the bucket)."""
  _Bucket.store.clear()
  uploaded = [0]
  write = MemoryFile.write

  def counting(self, data):
    uploaded[0] += len(data)
    return write(self, data)

  MemoryFile.write = counting
  try:
    writer = metrics.MetricWriter(epath.Path(f"gs://bucket/run{records}"))
    start = uploaded[0]
    for step in range(1, records + 1):
      before = uploaded[0]
      writer.write(step, {f"metric_{i}": step + i / 7 for i in range(12)})
      last = uploaded[0] - before
    writer.close()
    return last, uploaded[0] - start, len(_Bucket.store)
  finally:
    MemoryFile.write = write


def main(argv):
  del argv
  fsspec.register_implementation("gs", _Bucket, clobber=True)
  fsspec.register_implementation("gcs", _Bucket, clobber=True)
  os.chdir(tempfile.mkdtemp())
  print("| records | bytes uploaded by the last record | mean bytes per record | objects |")
  print("|---|---|---|---|")
  for n in map(int, _RECORDS.value):
    last, total, objects = measure(n)
    print(f"| {n} | {last:,} | {total / n:,.0f} | {objects} |")


if __name__ == "__main__":
  harness.run(main)
