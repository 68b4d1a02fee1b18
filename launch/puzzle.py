"""Shows a trained puzzle model (latent recursion, ``model.recursion``) at work: its answers to
a few puzzles and its accuracy after each supervision step.

    # three test Sudokus, then accuracy after each of the eval supervision steps
    python -m launch.puzzle --workdir=/tmp/sudoku_trm
    # more test-time supervision steps than training ran, other examples, all of the split
    python -m launch.puzzle --workdir=/tmp/sudoku_trm --steps=32 --index=10 --num=5 \
        --eval_examples=0

The model and its config come from the latest checkpoint of WORKDIR (its stored config, as
``launch.generate`` reads it; ``--step`` picks another); the parameters are their moving
average where the run kept one (``train.ema_decay``, ``train.eval_params``), else the
trained ones. The puzzles are the run's own data (``data.*`` of the stored config).

For each shown example: the puzzle grid (Sudoku blanks ``.``; mazes in HRM's characters
``# SGo``), the model's answer with each wrong cell marked ``*``, the solution, whether the
answer is exactly right, and the supervision step at which the halting head halted (the
answer shown is the one evaluation scores: at that step with ``eval_halting``, else after
the last step). Then exact-puzzle and per-cell accuracy after each step 1..``--steps`` over
``--eval_examples`` examples, without halting (``exact_by_step`` / ``cells_by_step`` of the
eval step).
"""

import os
import sys

from absl import app, flags, logging

from xlps import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained puzzle run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", "test", "Eval split of the run's data.")
_NUM = flags.DEFINE_integer("num", 3, "Examples to show.")
_INDEX = flags.DEFINE_integer("index", 0, "First example shown.")
_STEPS = flags.DEFINE_integer("steps", 0, "Test-time supervision steps, also beyond "
                              "training's (0 = the checkpoint's "
                              "model.recursion.eval_supervision_steps).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 256, "Examples of the accuracy-vs-steps "
                                      "table, from the first (0 = the whole split).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Rows per batch of the accuracy table.")

PUZZLE_KINDS = {"sudoku": "sudoku", "maze": "maze"}
FILE_KINDS = {"sudoku_csv": "sudoku", "maze_csv": "maze", "arc": "arc"}


# ------------------------------------------------------------------------------- rendering


def puzzle_kind(config) -> tuple[str, int]:
  """(sudoku | maze | arc, grid side) of the run's data."""
  from xlps.data import puzzles
  d = config.data
  kind = FILE_KINDS.get(d.puzzle_format) if d.name == "puzzle_files" else PUZZLE_KINDS.get(d.name)
  if kind is None:
    raise config_lib.ConfigError(f"data.name={d.name!r} is not puzzle data; launch.puzzle "
                                 "needs a run on sudoku, maze or puzzle_files")
  return kind, puzzles.ARC_MAX if kind == "arc" else d.puzzle_size


def cell_text(token: int, kind: str) -> str:
  """One character for a token of ``kind`` (xlps.data.puzzles' encodings): Sudoku ``.`` =
  blank, digits; maze ``# SGo``; ARC colours 0..9, ``/`` = end marker, blank = padding;
  ``?`` for a token the puzzle does not use."""
  from xlps.data import puzzles
  token = int(token)
  if kind == "sudoku":
    return "." if token == puzzles.SUDOKU_BLANK else str(token - 1) if 2 <= token <= 10 else "?"
  if kind == "maze":
    return puzzles.MAZE_CHARS[token - 1] if 1 <= token <= len(puzzles.MAZE_CHARS) else "?"
  if token == puzzles.ARC_PAD:
    return " "
  return "/" if token == puzzles.ARC_END else str(token - 2) if 2 <= token <= 11 else "?"


def grid_lines(tokens, kind: str, side: int, wrong=None, crop=None) -> list[str]:
  """The grid's lines: every cell its character then ``*`` (wrong) or a space; Sudoku boxes
  separated by ``|`` and ``-``; ``crop`` = (rows, columns) shown (ARC's canvas)."""
  import numpy as np
  from xlps.data import puzzles
  grid = np.asarray(tokens).reshape(side, side)
  wrong = np.zeros_like(grid, bool) if wrong is None else np.asarray(wrong).reshape(side, side)
  rows, cols = crop or (side, side)
  box = puzzles.sudoku_box(side) if kind == "sudoku" else None
  lines = []
  for r in range(rows):
    if box and r and r % box[0] == 0:
      lines.append("+-".join("-" * (3 * box[1]) for _ in range(side // box[1]))[:-1])
    cells = []
    for c in range(cols):
      if box and c and c % box[1] == 0:
        cells.append("| ")
      text = cell_text(grid[r, c], kind) + ("*" if wrong[r, c] else " ")
      cells.append(text + " " if kind == "sudoku" else text)
    lines.append("".join(cells).rstrip())
  return lines


def side_by_side(blocks: list[tuple[str, list[str]]], gap: int = 4) -> list[str]:
  widths = [max(len(title), *(len(line) for line in lines)) for title, lines in blocks]
  height = max(len(lines) for _, lines in blocks)
  out = ["".join(title.ljust(w + gap) for (title, _), w in zip(blocks, widths)).rstrip()]
  for i in range(height):
    out.append("".join((lines[i] if i < len(lines) else "").ljust(w + gap)
                       for (_, lines), w in zip(blocks, widths)).rstrip())
  return out


def arc_crop(inputs, labels, side: int) -> tuple[int, int]:
  """Rows and columns of the canvas holding any non-padding cell of the input or label."""
  import numpy as np
  used = (np.asarray(inputs).reshape(side, side) != 0) | (np.asarray(labels).reshape(side, side)
                                                            != 0)
  rows, cols = np.nonzero(used)
  return (int(rows.max()) + 1, int(cols.max()) + 1) if rows.size else (1, 1)


# ------------------------------------------------------------------------------- the model


def restore(workdir: str, step: int | None):
  """``(config, params, step, averaged)`` of the checkpoint: its stored config (as
  ``interop.read_checkpoint`` reads it), the state restored onto that config's train state,
  and its EMA parameters where the run kept them (``averaged``)."""
  import flax.linen as nn
  import jax
  from xlps import checkpoint as checkpoint_lib
  from xlps import models, train
  checkpoints = train.workdir_path(workdir) / "checkpoints"
  if not checkpoints.is_dir():  # reading through Orbax would create it
    raise config_lib.ConfigError(f"--workdir={workdir!r} holds no checkpoints "
                                 f"({os.fspath(checkpoints)} does not exist); valid: the "
                                 "--workdir of a training run")
  ckpt = checkpoint_lib.Checkpointer(checkpoints, async_save=False)
  try:
    if step is None:
      newest = ckpt.newest_metadata()
      if newest is None:
        raise config_lib.ConfigError(f"--workdir={workdir!r}: {ckpt.directory} holds no "
                                     "checkpoint")
      metadata = newest[1]
    else:
      if step not in ckpt.all_steps():
        raise config_lib.ConfigError(f"--step={step}: {ckpt.directory} holds no checkpoint "
                                     f"step {step} (steps: {ckpt.all_steps()})")
      metadata = ckpt.metadata(step)
    config = config_lib.from_saved(metadata["config"])
    spec = models.spec_of(config)
    if spec.recursion is None:
      raise config_lib.ConfigError(f"--workdir={workdir!r} holds a {spec.family} model without "
                                   "latent recursion; launch.puzzle needs a puzzle model with "
                                   "model.recursion.net_layers > 0")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    optimizer = train.make_optimizer(config.train)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: nn.unbox(train.init_state(spec, optimizer, config.seed))))
    if step is None:
      step, state, _, _ = ckpt.restore_latest(abstract, move_aside=False)
    else:
      state, _, _ = ckpt.restore_checked(step, abstract)
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"--workdir={workdir!r}: {e}") from None
  finally:
    ckpt.close()
  params = train.eval_params(state)
  return config, params, step, params is not state.params


def make_programs(spec):
  """(trajectory, eval): jitted ``trajectory(params, batch)`` -> argmax answers [S, B, L] and
  halting logits q [S, B, 2] after each supervision step (no halting), and the family's
  ``eval_step`` (``exact_by_step`` / ``cells_by_step``)."""
  import functools
  import jax
  from xlps import models, train
  from xlps.models.controllers import recursion
  model = models.build(spec)
  steps = spec.recursion.eval_supervision_steps

  @jax.jit
  def trajectory(params, batch):
    def body(carried, _):
      logits, q, new = model.apply({"params": params}, batch, deterministic=True,
                                   carried=carried)
      return new, (logits.argmax(-1), q)
    start = {recursion.Recursion.name: recursion.initial_carry(
        (*batch["inputs"].shape, spec.d_model), spec.dtype)}
    return jax.lax.scan(body, start, None, length=steps)[1]

  return trajectory, jax.jit(functools.partial(train.family_steps(spec)[1], model=model))


def halted_at(q, halting: str):
  """Per example: the first step (1-based) whose halting logits say stop
  (``recursion.halts``), 0 where none does; ``q``: [S, B, 2]."""
  import numpy as np
  if halting == "bce":
    stop = q[..., 0] > 0
  elif halting == "q_learning":
    stop = q[..., 0] > q[..., 1]
  else:
    stop = np.zeros(q.shape[:2], bool)
  return np.where(stop.any(0), stop.argmax(0) + 1, 0)


def batches(records, kind: str, side: int, size: int):
  """Batches of ``size`` rows (layout puzzle; the last padded with weight-0 rows)."""
  import numpy as np
  from xlps.data import pipeline
  for lo in range(0, len(records), size):
    rows = [pipeline.puzzle_features(r, kind, side) for r in records[lo:lo + size]]
    pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows += [pad] * (size - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def show_examples(spec, kind: str, side: int, records, start: int, trajectory,
                  params) -> None:
  import numpy as np
  r = spec.recursion
  steps = r.eval_supervision_steps
  shown = [records[i] for i in range(start, min(start + _NUM.value, len(records)))]
  if not shown:
    return
  batch = next(batches(shown, kind, side, len(shown)))
  answers, q = (np.asarray(a) for a in trajectory(params, batch))
  halted = halted_at(q, r.halting)
  for row, record in enumerate(shown):
    at = (halted[row] or steps) if r.eval_halting else steps
    answer = answers[at - 1, row]
    weights = batch["weights"][row] > 0
    wrong = (answer != batch["targets"][row]) & weights
    crop = arc_crop(batch["inputs"][row], batch["targets"][row], side) if kind == "arc" else None
    verdict = ("RIGHT (exactly solved)" if not wrong.any() else
               f"WRONG ({int(wrong.sum())} of {int(weights.sum())} cells wrong)")
    if r.halting == "none":
      halt = "no halting head (model.recursion.halting='none')"
    elif halted[row]:
      halt = f"halting head halted at step {halted[row]} of {steps}"
    else:
      halt = f"halting head did not halt in {steps} steps"
    print(f"--- {_SPLIT.value} example {start + row} (id {record.get('id', start + row)}): "
          f"{verdict}; {halt}; answer after step {at}")
    for line in side_by_side([
        ("puzzle", grid_lines(batch["inputs"][row], kind, side, crop=crop)),
        ("model answer (* = wrong)", grid_lines(answer, kind, side, wrong, crop)),
        ("solution", grid_lines(batch["targets"][row], kind, side, crop=crop))]):
      print(line)


def accuracy_by_step(spec, kind: str, side: int, records, evaluate, params) -> None:
  import jax
  r = spec.recursion
  sums = None
  for batch in batches(records, kind, side, _BATCH_SIZE.value):
    m = jax.device_get(evaluate(params, batch))
    m["cells"] = batch["weights"].sum()
    sums = m if sums is None else {k: sums[k] + m[k] for k in m}
  n, cells = float(sums["sequences"]), max(float(sums["cells"]), 1.0)
  print(f"accuracy vs. supervision steps over {int(n)} {_SPLIT.value} examples "
        f"(no halting; training ran up to {r.supervision_steps}):")
  for s in range(r.eval_supervision_steps):
    exact = float(sums["exact_by_step"][s])
    beyond = "  (beyond training)" if s + 1 > r.supervision_steps else ""
    print(f"step {s + 1:3d}: exact {exact / max(n, 1.0):.4f} ({int(exact)}/{int(n)}), "
          f"cells {float(sums['cells_by_step'][s]) / cells:.4f}{beyond}")
  if r.halting != "none":
    rule = "at its halting step" if r.eval_halting else "after the last step"
    print(f"with halting (answer {rule}): exact "
          f"{float(sums['seq_correct']) / max(n, 1.0):.4f}, cells "
          f"{float(sums['correct']) / cells:.4f}, mean step "
          f"{float(sums['supervision_steps']) / float(sums['batches']):.2f}")


def check_flags() -> None:
  """ConfigError for a flag value that cannot work, before anything is read."""
  for flag, low in ((_NUM, 0), (_INDEX, 0), (_STEPS, 0), (_EVAL_EXAMPLES, 0), (_BATCH_SIZE, 1)):
    if flag.value < low:
      raise config_lib.ConfigError(f"--{flag.name}={flag.value} must be an integer >= {low}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO
  from xlps import data, models
  try:
    check_flags()
    config, params, step, averaged = restore(_WORKDIR.value, _STEP.value)
    kind, side = puzzle_kind(config)
    trained = config.model.recursion.eval_supervision_steps or \
        config.model.recursion.supervision_steps
    if _STEPS.value:
      config.model.recursion.eval_supervision_steps = _STEPS.value
    spec = models.spec_of(config)
    r = spec.recursion
    pipeline = data.build(config)
    if _SPLIT.value not in pipeline.eval_splits:
      raise config_lib.ConfigError(f"--split={_SPLIT.value!r} is not an eval split of this "
                                   f"run's data; valid: {', '.join(pipeline.eval_splits)}")
    records = pipeline.eval_records(_SPLIT.value)
    if _INDEX.value >= len(records):
      raise config_lib.ConfigError(f"--index={_INDEX.value} is past the {len(records)} "
                                   f"examples of {_SPLIT.value}; valid: 0..{len(records) - 1}")
    print(f"{_WORKDIR.value}: step {step}, {kind} {side}x{side}, "
          f"{'EMA' if averaged else 'trained'} params; T={r.cycles} cycles x (n={r.latent_steps}"
          f" + 1) x {r.net_layers} layers per supervision step, {r.eval_supervision_steps} "
          f"test-time steps (eval default {trained}), halting {r.halting}")
    trajectory, evaluate = make_programs(spec)
    show_examples(spec, kind, side, records, _INDEX.value, trajectory, params)
    limit = len(records) if _EVAL_EXAMPLES.value == 0 else min(_EVAL_EXAMPLES.value,
                                                                 len(records))
    accuracy_by_step(spec, kind, side, [records[i] for i in range(limit)], evaluate, params)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
