"""One CLI convention for the bench scripts (every ``bench/*.py`` with a ``main``): absl flags
(``flags.DEFINE_*``), run by ``harness.run(main)`` (or ``app.run(main)``), the exact command
in the module docstring (``python -m bench.NAME``), and every command quoted in a docstring
or a committed ``bench/*.md`` naming only flags that its script defines."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _scripts() -> list[str]:
  return [path.stem for path in sorted(BENCH.glob("*.py"))
          if any(isinstance(node, ast.FunctionDef) and node.name == "main"
                 for node in ast.parse(path.read_text()).body)]


SCRIPTS = _scripts()

# Imports each script in turn (one process, jax imported once) and prints, per script, the
# absl flags it defines and every flag name known while it is imported (absl's own and
# bench.harness's too); its flags are removed before the next script defines its own.
_PROBE = """
import importlib, json, os, sys
from absl import flags
watched = lambda: {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}
out = {}
for name in sys.argv[1:]:
  before = watched()
  importlib.import_module("bench." + name)
  own = list(flags.FLAGS.flags_by_module_dict().get("bench." + name, []))
  out[name] = {"own": sorted(f.name for f in own),
               "boolean": sorted(f.name for f in own if f.boolean),
               "known": sorted(flags.FLAGS), "env_changed": watched() != before}
  for flag in own:
    delattr(flags.FLAGS, flag.name)
  del sys.modules["bench." + name]
print(json.dumps(out))
"""


def _docstring(name: str) -> str:
  return ast.get_docstring(ast.parse((BENCH / f"{name}.py").read_text())) or ""


def test_there_are_scripts():
  assert {"decode", "compile_time", "step_vs_torch", "sharding"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_is_an_absl_program(name):
  tree = ast.parse((BENCH / f"{name}.py").read_text())
  assert f"python -m bench.{name}" in _docstring(name), \
      f"bench/{name}.py: its docstring must hold its command, `python -m bench.{name} ...`"
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      modules.add(node.module or "")
    elif isinstance(node, ast.Attribute) and node.attr == "argv":
      assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), \
          f"bench/{name}.py reads sys.argv: define absl flags instead"
  assert not modules & {"argparse", "optparse", "click", "fire"}, \
      f"bench/{name}.py parses its own command line: define absl flags instead"
  runs = [stmt for node in tree.body if isinstance(node, ast.If)
          and ast.unparse(node.test) in ("__name__ == '__main__'", "'__main__' == __name__")
          for stmt in node.body]
  assert any(isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
             and ast.unparse(stmt.value.func) in ("harness.run", "app.run")
             and stmt.value.args and ast.unparse(stmt.value.args[0]) == "main"
             for stmt in runs), \
      f"bench/{name}.py must end with `if __name__ == '__main__': harness.run(main)`"


def _commands(text: str) -> list[tuple[str, str]]:
  """(script, the rest of its command line) of every ``python -m bench.NAME ...`` in text;
  lines ending in a backslash continue."""
  text = re.sub(r"\\\n\s*", " ", text)
  return [(m.group(1), re.split(r"`|  #", m.group(2))[0])
          for m in re.finditer(r"python -m bench\.(\w+)([^\n]*)", text)]


def test_flags_and_quoted_commands():
  probe = subprocess.run([sys.executable, "-c", _PROBE, *SCRIPTS], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert probe.returncode == 0, probe.stderr[-3000:]
  info = json.loads(probe.stdout.strip().splitlines()[-1])
  for name in SCRIPTS:
    assert not info[name]["env_changed"], \
        f"importing bench.{name} changed XLA_*/JAX_* variables: set them in harness.run"
  sources = [(f"bench/{name}.py", _docstring(name))
             for name in SCRIPTS]
  sources += [(str(path.relative_to(ROOT)), path.read_text())
              for path in sorted(BENCH.glob("*.md"))]
  checked = 0
  for where, text in sources:
    for name, args in _commands(text):
      assert name in info, f"{where} quotes `python -m bench.{name}`: no such bench script"
      known, boolean = set(info[name]["known"]), set(info[name]["boolean"])
      for negated, flag in re.findall(r"(?<![\w-])--(no)?([A-Za-z_]\w*)", args):
        ok = flag in known if not negated else (flag in boolean or "no" + flag in known)
        assert ok, f"{where} quotes `python -m bench.{name} ... --{negated}{flag}`: " \
                   f"bench.{name} has no such flag ({', '.join(info[name]['own'])})"
        checked += 1
  assert checked > 20


def test_harness_runs_a_script():
  done = subprocess.run([sys.executable, "-m", "bench.remote_metrics", "--records=2"],
                        cwd=ROOT, text=True, capture_output=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| 2 |" in done.stdout
