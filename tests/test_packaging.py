"""The installed library is ``xlps`` alone: it never imports the repository's ``configs/``,
its wheel holds only ``xlps``, and HF conversion works outside the repository root."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Never copied into the wheel build: local state, not sources (see .gitignore).
_NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


def _not_sources(directory: str, names: list[str]) -> set[str]:
  """``_NOT_SOURCES`` anywhere, and run workdirs (``/workdir*/``) at the top only: a module
  named ``workdir_*.py`` inside ``xlps/`` is a source."""
  ignored = shutil.ignore_patterns(*_NOT_SOURCES)(directory, names)
  if pathlib.Path(directory) == ROOT:
    ignored |= {n for n in names if n.startswith("workdir")}
  return ignored


def _imported_modules(path: pathlib.Path) -> list[str]:
  """Absolute module names that ``path`` imports (relative imports stay inside xlps)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names.append(node.module)
  return names


def test_library_never_imports_configs():
  offenders = [f"{path.relative_to(ROOT)}: import {name}"
               for path in sorted((ROOT / "xlps").rglob("*.py"))
               for name in _imported_modules(path)
               if name == "configs" or name.startswith("configs.")]
  assert not offenders, f"xlps imports the repository's configs/: {offenders}"


def test_wheel_contains_only_xlps(tmp_path):
  pytest.importorskip("setuptools", reason="--no-build-isolation builds with the installed "
                                           "setuptools")
  source = tmp_path / "src"  # a copy: an in-tree build/ would leak stale files into the wheel
  shutil.copytree(ROOT, source, ignore=_not_sources)
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", str(tmp_path / "dist"), str(source)],
                 check=True, capture_output=True, text=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top = {name.split("/")[0] for name in names}
  assert {t for t in top if not t.endswith(".dist-info")} == {"xlps"}, sorted(top)
  sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "xlps").rglob("*.py")}
  assert sources <= set(names), f"modules missing from the wheel: {sorted(sources - set(names))}"


def test_load_hf_outside_the_repository(tmp_path):
  pytest.importorskip("transformers", reason="pip install -e '.[interop]'")
  script = textwrap.dedent("""
      import sys
      sys.modules["configs"] = None  # an older editable install may still map configs/
      import transformers
      from xlps.interop import huggingface
      hf = transformers.AlbertForMaskedLM(transformers.AlbertConfig(
          vocab_size=300, hidden_size=32, embedding_size=16, num_attention_heads=4,
          intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64))
      config, params = huggingface.load_hf(hf)
      assert (config.model.family, config.model.num_layers) == ("encoder_mlm", 2), config.model
      print("converted", sorted(params))
  """)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["HF_HUB_OFFLINE"] = "1"
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "converted ['embedder', 'encoder', 'head']" in result.stdout
