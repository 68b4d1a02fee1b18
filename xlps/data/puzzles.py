"""Puzzles for recursive-reasoning models (HRM / TRM style): Sudoku, mazes and ARC tasks.

Pure numpy, no JAX: generators with their solvers, independent checkers, train-time
augmentation and loaders of the public files. Every puzzle is a pair of token sequences of
one fixed length ``L``, ``inputs`` (the puzzle) and ``labels`` (its solution), scored cell
by cell. The token encodings are those of HRM's published dataset builders
(sapientinc/HRM ``dataset/build_*_dataset.py``), so their data and ours use the same ids:

* **Sudoku** of size ``s`` (4, 6 or 9; boxes 2x2, 2x3 = 2 rows x 3 columns, 3x3):
  ``L = s*s`` cells, row-major. Token 0 = padding (never used in Sudoku), 1 = blank cell,
  2..s+1 = digits 1..s. ``vocab_size = s + 2`` (11 for 9x9, as HRM's Sudoku-Extreme).
* **Maze** ``N x N``: ``L = N*N`` cells, row-major. Token 0 = padding, then HRM's
  characters ``"# SGo"`` as 1..5: 1 = wall ``#``, 2 = open `` ``, 3 = start ``S``, 4 = goal
  ``G``, 5 = path ``o``. ``vocab_size = 6``. The input is the maze without the path; the
  label is the same grid with the cells of a shortest S-G path (S and G excluded) marked
  ``o``.
* **ARC**: a grid of up to 30x30 colours in the top-left corner of a 30x30 canvas, ``L =
  900``. Token 0 = padding, 1 = end marker, colours 0..9 = 2..11; ``vocab_size = 12``. As in
  HRM (without its random translation), the end marker fills the row just below the grid
  (under its columns) and the column just right of it (beside its rows), where these are
  inside the canvas; the corner cell below-right stays padding. One example is one
  (input grid -> output grid) pair: every train pair and every test pair of a task is an
  example of its own (no demonstrations in context, no per-task identifier).

Sudoku difficulty: ``generate_sudoku`` removes cells of a random full grid while the
solution stays unique; ``givens`` sets how many stay, and ``backtracks`` (dead ends of
``solve_sudoku``'s search for up to two solutions, i.e. for the solution and the proof that
it is unique; 0 for a puzzle solved by forced cells alone) is the hardness measure that
``min_backtracks`` thresholds.

Augmentation (train time, from an ``np.random.Generator``; the same transform on input and
label): Sudoku: digit relabelling (blanks stay), band permutation and row permutation within
bands, stack permutation and column permutation within stacks, and a transpose with
probability 1/2 for square boxes (4x4, 9x9): HRM's ``shuffle_sudoku`` generalised to 2x3
boxes. ARC: one of the 8 dihedral transforms (HRM's numbering, ``dihedral``) and a
permutation of colours 1..9 with colour 0 (black, the usual background) kept, as HRM's
``build_arc_dataset.py`` does. Mazes: none (HRM's maze builder has dihedral augmentation
off by default).

Public files (``load_*``): HRM's Sudoku-Extreme and Maze-Hard CSVs (header
``source,question,answer,rating``; Sudoku: 81 characters, ``.`` or ``0`` = blank, ``1``-``9``;
maze: ``N*N`` characters over ``# SGo``) and ARC-AGI task JSON folders. Every row / grid is
validated; a bad one raises ``ValueError`` naming the file, the row (or task and pair) and
the problem.
"""

from __future__ import annotations

import collections
import csv
import json
import math
import os
from collections.abc import Sequence

import numpy as np

# Sudoku
SUDOKU_SIZES = (4, 6, 9)
SUDOKU_BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}  # (rows, columns) of a box
SUDOKU_PAD, SUDOKU_BLANK = 0, 1                    # digit d is token d + 1
# Maze
MAZE_CHARS = "# SGo"
MAZE_PAD, MAZE_WALL, MAZE_OPEN, MAZE_START, MAZE_GOAL, MAZE_PATH = range(6)
MAZE_VOCAB_SIZE = len(MAZE_CHARS) + 1
MAZE_MIN_SIZE = 5
# ARC
ARC_MAX = 30
ARC_PAD, ARC_END = 0, 1                            # colour c is token c + 2
ARC_VOCAB_SIZE = 12
ARC_LEN = ARC_MAX * ARC_MAX
CSV_HEADER = ("source", "question", "answer", "rating")


def sudoku_vocab_size(size: int) -> int:
  return size + 2


def sudoku_box(size: int) -> tuple[int, int]:
  """(rows, columns) of a box of a ``size`` x ``size`` Sudoku."""
  if size not in SUDOKU_BOXES:
    raise ValueError(f"Sudoku size {size!r} is not supported; valid: {SUDOKU_SIZES}")
  return SUDOKU_BOXES[size]


# ---------------------------------------------------------------------------------------------
# Sudoku: solver, generator, checker (grids here are digit arrays: 0 = blank, 1..s = digits)


def _sudoku_units(size: int, box: tuple[int, int]):
  br, bc = box
  cells = [(i // size, i % size) for i in range(size * size)]
  rows = [r for r, _ in cells]
  cols = [c for _, c in cells]
  boxes = [(r // br) * (size // bc) + c // bc for r, c in cells]
  return rows, cols, boxes


def _search(grid: Sequence[int], size: int, box: tuple[int, int], limit: int,
            rng: np.random.Generator | None = None,
            forbid: tuple[int, int] | None = None) -> tuple[list[list[int]], int]:
  """Depth-first search over ``grid`` (flat digits, 0 = blank) for up to ``limit`` solutions.

  Bitmask candidates; the next cell is the blank with the fewest candidates (a cell with
  one is filled at once, one with none is a dead end). ``rng`` shuffles the order in which
  a cell's candidates are tried (random full grids); ``forbid`` = (cell, digit) removes one
  candidate of one cell. Returns (solutions, backtracks): a backtrack is a guess undone
  because it led to a dead end or because the search went on for another solution.
  """
  n = size * size
  rows, cols, boxes = _sudoku_units(size, box)
  full = (1 << (size + 1)) - 2  # bits 1..size
  row_m, col_m, box_m = [0] * size, [0] * size, [0] * size
  cells = list(grid)
  for i, v in enumerate(cells):
    if v:
      bit = 1 << v
      if row_m[rows[i]] & bit or col_m[cols[i]] & bit or box_m[boxes[i]] & bit:
        return [], 0  # the givens already clash
      row_m[rows[i]] |= bit
      col_m[cols[i]] |= bit
      box_m[boxes[i]] |= bit
  blanks = [i for i in range(n) if not cells[i]]
  extra = [0] * n  # forbidden candidates per cell
  if forbid is not None:
    extra[forbid[0]] = 1 << forbid[1]
  solutions: list[list[int]] = []
  backtracks = 0

  def candidates(i):
    return full & ~(row_m[rows[i]] | col_m[cols[i]] | box_m[boxes[i]] | extra[i])

  def recurse(depth: int) -> None:
    nonlocal backtracks
    if depth == len(blanks):
      solutions.append(list(cells))
      return
    # most-constrained blank among blanks[depth:], swapped to position depth
    best, best_count, best_mask = depth, size + 1, 0
    for k in range(depth, len(blanks)):
      mask = candidates(blanks[k])
      count = mask.bit_count()
      if count < best_count:
        best, best_count, best_mask = k, count, mask
        if count <= 1:
          break
    if best_count == 0:
      return
    blanks[depth], blanks[best] = blanks[best], blanks[depth]
    i = blanks[depth]
    digits = [d for d in range(1, size + 1) if best_mask >> d & 1]
    if rng is not None and len(digits) > 1:
      digits = [digits[j] for j in rng.permutation(len(digits))]
    r, c, b = rows[i], cols[i], boxes[i]
    for t, d in enumerate(digits):
      bit = 1 << d
      cells[i] = d
      row_m[r] |= bit
      col_m[c] |= bit
      box_m[b] |= bit
      recurse(depth + 1)
      row_m[r] &= ~bit
      col_m[c] &= ~bit
      box_m[b] &= ~bit
      cells[i] = 0
      if len(solutions) >= limit:
        return
      if len(digits) > 1 and t < len(digits) - 1:
        backtracks += 1
    # (the caller's loop counts this dead end when it tries its next digit)

  recurse(0)
  return solutions, backtracks


def solve_sudoku(grid: np.ndarray, box: tuple[int, int] | None = None,
                 limit: int = 2) -> tuple[list[np.ndarray], int]:
  """Up to ``limit`` solutions of ``grid`` (digits 0..s, 0 = blank; shape [s, s] or [s*s])
  and the number of backtracks the search took (hardness). ``box`` defaults to the size's.

  ``len(solutions) == 1`` with ``limit=2`` proves the solution unique. Solutions come back
  in ``grid``'s shape.
  """
  grid = np.asarray(grid)
  size = int(round(math.sqrt(grid.size)))
  box = box or sudoku_box(size)
  solutions, backtracks = _search([int(v) for v in grid.reshape(-1)], size, box, limit)
  return [np.array(s, grid.dtype).reshape(grid.shape) for s in solutions], backtracks


def random_full_sudoku(size: int, rng: np.random.Generator) -> np.ndarray:
  """A uniformly-ish random solved grid: the randomised solver on the empty grid."""
  box = sudoku_box(size)
  solutions, _ = _search([0] * (size * size), size, box, 1, rng=rng)
  return np.array(solutions[0], np.uint8).reshape(size, size)


def _remove_cells(solution: np.ndarray, givens: int, rng: np.random.Generator) -> np.ndarray:
  """One pass over the cells in random order, blanking each whose removal keeps the solution
  unique, until ``givens`` remain (0: until the pass ends, a minimal puzzle)."""
  size = solution.shape[0]
  box = sudoku_box(size)
  rows, cols, boxes = _sudoku_units(size, box)
  puzzle = [int(v) for v in solution.reshape(-1)]
  count = len(puzzle)
  for i in rng.permutation(len(puzzle)):
    if count <= givens:
      break
    i, value = int(i), puzzle[i]
    puzzle[i] = 0
    # Forced by the other givens (one candidate left): removing it cannot add a solution.
    seen = {puzzle[j] for j in range(len(puzzle))
            if puzzle[j] and (rows[j] == rows[i] or cols[j] == cols[i] or boxes[j] == boxes[i])}
    if len(seen) < size - 1:
      # Unique iff no solution with another digit here (the old puzzle's is unique).
      other, _ = _search(puzzle, size, box, 1, forbid=(i, value))
      if other:
        puzzle[i] = value
        continue
    count -= 1
  return np.array(puzzle, np.uint8).reshape(size, size)


def generate_sudoku(size: int, givens: int, rng: np.random.Generator, min_backtracks: int = 0,
                    max_tries: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
  """(puzzle, solution, backtracks): a Sudoku with a unique solution, digit grids [s, s]
  (0 = blank in the puzzle).

  A random solved grid loses cells in random order while the solution stays unique, down to
  exactly ``givens`` givens; ``givens=0`` keeps going until no cell can go (a minimal puzzle,
  whose number of givens varies). A grid whose single pass stops above ``givens``, or a
  puzzle with fewer than ``min_backtracks`` backtracks (``solve_sudoku`` with limit 2), is
  discarded and another grid drawn, at most ``max_tries`` times (then ValueError: the
  request is too hard for this generator; ask for more givens or fewer backtracks).
  """
  box = sudoku_box(size)
  if not 0 <= givens <= size * size:
    raise ValueError(f"givens={givens} must be in [0, {size * size}] for a {size}x{size} Sudoku")
  stopped = []
  for _ in range(max_tries):
    solution = random_full_sudoku(size, rng)
    puzzle = _remove_cells(solution, givens, rng)
    have = int((puzzle > 0).sum())
    if givens and have != givens:
      stopped.append(have)
      continue
    solutions, backtracks = solve_sudoku(puzzle, box, limit=2)
    assert len(solutions) == 1 and (solutions[0] == solution).all()
    if backtracks >= min_backtracks:
      return puzzle, solution, backtracks
  why = (f"the removal stopped at {min(stopped)}..{max(stopped)} givens" if stopped else
         f"none had {min_backtracks} backtracks")
  raise ValueError(f"no {size}x{size} Sudoku with {givens or 'minimal'} givens and >= "
                   f"{min_backtracks} backtracks in {max_tries} tries ({why}); ask for more "
                   "givens or fewer backtracks")


def check_sudoku(puzzle: np.ndarray, solution: np.ndarray, size: int) -> str | None:
  """None if ``solution`` is a solved ``size`` x ``size`` grid that agrees with ``puzzle``'s
  givens (digit grids, 0 = blank; any shape of ``size*size`` cells), else the problem.

  Independent of the solver: it checks that every row, column and box holds 1..s once.
  """
  if size not in SUDOKU_BOXES:
    return f"size {size} is not one of {SUDOKU_SIZES}"
  puzzle, solution = np.asarray(puzzle), np.asarray(solution)
  for name, grid in (("puzzle", puzzle), ("solution", solution)):
    if grid.size != size * size:
      return f"the {name} has {grid.size} cells, not {size * size}"
  puzzle = puzzle.reshape(size, size).astype(np.int64)
  solution = solution.reshape(size, size).astype(np.int64)
  if puzzle.min() < 0 or puzzle.max() > size:
    return f"the puzzle has a value outside 0..{size}"
  if solution.min() < 1 or solution.max() > size:
    return f"the solution has a value outside 1..{size} (a blank or a bad digit)"
  digits = np.arange(1, size + 1)
  br, bc = SUDOKU_BOXES[size]
  units = [("row", r, solution[r]) for r in range(size)]
  units += [("column", c, solution[:, c]) for c in range(size)]
  units += [("box", (r // br) * (size // bc) + c // bc, solution[r:r + br, c:c + bc].reshape(-1))
            for r in range(0, size, br) for c in range(0, size, bc)]
  for kind, index, values in units:
    if not np.array_equal(np.sort(values), digits):
      return f"{kind} {index + 1} of the solution is {values.tolist()}, not a permutation of 1..{size}"
  clash = np.argwhere((puzzle > 0) & (puzzle != solution))
  if len(clash):
    r, c = clash[0]
    return (f"the solution has {solution[r, c]} at row {r + 1}, column {c + 1} where the puzzle "
            f"gives {puzzle[r, c]}")
  return None


def sudoku_tokens(grid: np.ndarray) -> np.ndarray:
  """Digits (0 = blank) -> tokens (1 = blank, d + 1), flat uint8."""
  return (np.asarray(grid).reshape(-1) + 1).astype(np.uint8)


def sudoku_digits(tokens: np.ndarray, size: int) -> np.ndarray:
  """Tokens -> digit grid [s, s] (0 = blank; padding 0 also reads as blank)."""
  return np.maximum(np.asarray(tokens).astype(np.int64) - 1, 0).reshape(size, size)


def augment_sudoku(inputs: np.ndarray, labels: np.ndarray, size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The same random validity-preserving transform of a Sudoku's input and label tokens
  (flat [s*s]; see the module docstring). Returns new arrays of the inputs' dtype."""
  br, bc = sudoku_box(size)
  relabel = np.arange(size + 2)
  relabel[2:] = rng.permutation(size) + 2  # tokens 0 (pad) and 1 (blank) stay
  transpose = br == bc and rng.random() < 0.5
  bands = rng.permutation(size // br)
  row_perm = np.concatenate([b * br + rng.permutation(br) for b in bands])
  stacks = rng.permutation(size // bc)
  col_perm = np.concatenate([s * bc + rng.permutation(bc) for s in stacks])

  def apply(tokens):
    grid = np.asarray(tokens).reshape(size, size)
    if transpose:
      grid = grid.T
    return relabel[grid[row_perm][:, col_perm]].reshape(-1).astype(np.asarray(tokens).dtype)

  return apply(inputs), apply(labels)


# ---------------------------------------------------------------------------------------------
# Mazes (grids of tokens 1..5)


def _neighbours(r: int, c: int, n: int):
  for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
    rr, cc = r + dr, c + dc
    if 0 <= rr < n and 0 <= cc < n:
      yield rr, cc


def _bfs(grid: np.ndarray, start: tuple[int, int]) -> dict[tuple[int, int], tuple[int, int] | None]:
  """Parents of every cell reachable from ``start`` through non-wall cells (queue BFS)."""
  n = grid.shape[0]
  parent = {start: None}
  queue = collections.deque([start])
  while queue:
    cell = queue.popleft()
    for nb in _neighbours(*cell, n):
      if nb not in parent and grid[nb] != MAZE_WALL:
        parent[nb] = cell
        queue.append(nb)
  return parent


def _farthest(grid: np.ndarray, start: tuple[int, int],
              rng: np.random.Generator) -> tuple[int, int]:
  parent = _bfs(grid, start)
  dist = {start: 0}
  for cell in parent:  # BFS order: parents come first
    if parent[cell] is not None:
      dist[cell] = dist[parent[cell]] + 1
  far = max(dist.values())
  ends = sorted(c for c, d in dist.items() if d == far)
  return ends[int(rng.integers(len(ends)))]


def generate_maze(n: int, rng: np.random.Generator,
                  loops: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """(input, label) tokens, flat [n*n]: a random maze with start and goal far apart.

  A randomised depth-first search carves a spanning tree of the cells at odd coordinates
  (walls everywhere else, so the border is wall; for an even ``n`` the last row and column
  stay wall too); then a fraction ``loops`` of the remaining walls between two carved cells
  is opened, so that there are several routes and the shortest one has to be found. The
  goal is the farthest cell from a random start, the start the farthest from that goal
  (ties broken at random). The label marks a BFS shortest path.
  """
  if n < MAZE_MIN_SIZE:
    raise ValueError(f"maze size {n} must be >= {MAZE_MIN_SIZE}")
  grid = np.full((n, n), MAZE_WALL, np.uint8)
  lattice = [(r, c) for r in range(1, n - 1, 2) for c in range(1, n - 1, 2)]
  start = lattice[int(rng.integers(len(lattice)))]
  grid[start] = MAZE_OPEN
  stack = [start]
  steps = ((-2, 0), (2, 0), (0, -2), (0, 2))
  while stack:
    r, c = stack[-1]
    options = [(r + dr, c + dc) for dr, dc in steps
               if 0 < r + dr < n - 1 and 0 < c + dc < n - 1 and grid[r + dr, c + dc] == MAZE_WALL]
    if not options:
      stack.pop()
      continue
    nr, nc = options[int(rng.integers(len(options)))]
    grid[(r + nr) // 2, (c + nc) // 2] = MAZE_OPEN
    grid[nr, nc] = MAZE_OPEN
    stack.append((nr, nc))
  # walls between two carved lattice cells (odd row & even column, or even row & odd column)
  walls = [(r, c) for r in range(1, n - 1) for c in range(1, n - 1)
           if grid[r, c] == MAZE_WALL and (r % 2) != (c % 2)
           and ((r % 2 and grid[r, c - 1] == MAZE_OPEN and c + 1 < n - 1
                 and grid[r, c + 1] == MAZE_OPEN)
                or (c % 2 and grid[r - 1, c] == MAZE_OPEN and r + 1 < n - 1
                    and grid[r + 1, c] == MAZE_OPEN))]
  for k in rng.permutation(len(walls))[:int(round(loops * len(walls)))]:
    grid[walls[int(k)]] = MAZE_OPEN
  open_cells = [tuple(x) for x in np.argwhere(grid == MAZE_OPEN)]
  seed_cell = open_cells[int(rng.integers(len(open_cells)))]
  goal = _farthest(grid, seed_cell, rng)
  begin = _farthest(grid, goal, rng)
  grid[begin], grid[goal] = MAZE_START, MAZE_GOAL
  label = grid.copy()
  parent = _bfs(grid, begin)
  cell = parent[goal]
  while cell != begin:
    label[cell] = MAZE_PATH
    cell = parent[cell]
  return grid.reshape(-1), label.reshape(-1)


def _distances(passable: np.ndarray, source: tuple[int, int]) -> np.ndarray:
  """Shortest 4-neighbour distances from ``source`` over ``passable`` cells, by repeated
  relaxation of the whole grid (not a queue BFS: the checker's independent method)."""
  big = passable.size + 1
  dist = np.full(passable.shape, big, np.int64)
  dist[source] = 0
  while True:
    padded = np.pad(dist, 1, constant_values=big)
    best = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                              padded[1:-1, 2:]]) + 1
    new = np.where(passable, np.minimum(dist, best), big)
    new[source] = 0
    if np.array_equal(new, dist):
      return dist
    dist = new


def check_maze(inputs: np.ndarray, labels: np.ndarray) -> str | None:
  """None if ``labels`` marks a shortest start-goal path of maze ``inputs`` (tokens, flat
  [N*N] or [N, N]), else the problem. Independent of the generator: the path is walked
  from S to G through 4-neighbours, and its length compared with distances computed by
  whole-grid relaxation."""
  inputs, labels = np.asarray(inputs), np.asarray(labels)
  n = int(round(math.sqrt(inputs.size)))
  if n * n != inputs.size or inputs.size != labels.size:
    return f"input ({inputs.size} cells) and label ({labels.size}) must be one square grid"
  grid, label = inputs.reshape(n, n), labels.reshape(n, n)
  if not np.isin(grid, (MAZE_WALL, MAZE_OPEN, MAZE_START, MAZE_GOAL)).all():
    return "the input has a cell that is not wall, open, start or goal (a path or padding)"
  for token, name in ((MAZE_START, "start S"), (MAZE_GOAL, "goal G")):
    if (grid == token).sum() != 1:
      return f"the input has {(grid == token).sum()} {name} cells, not 1"
  changed = label != grid
  if not ((label[changed] == MAZE_PATH) & (grid[changed] == MAZE_OPEN)).all():
    return "the label differs from the input other than by marking open cells 'o'"
  start = tuple(int(x) for x in np.argwhere(grid == MAZE_START)[0])
  goal = tuple(int(x) for x in np.argwhere(grid == MAZE_GOAL)[0])
  path = {tuple(int(x) for x in p) for p in np.argwhere(label == MAZE_PATH)}
  cell, seen = start, {start}
  while cell != goal:
    nexts = [nb for nb in _neighbours(*cell, n) if nb not in seen and (nb in path or nb == goal)]
    if goal in nexts:
      nexts = [goal]
    if len(nexts) != 1:
      return (f"the path is {'broken' if not nexts else 'branching'} at row {cell[0] + 1}, "
              f"column {cell[1] + 1}")
    cell = nexts[0]
    seen.add(cell)
  if len(seen) - 2 != len(path):
    return f"{len(path) - (len(seen) - 2)} path cells are off the S-G walk"
  dist = _distances(grid != MAZE_WALL, start)
  if dist[goal] > n * n:
    return "the goal cannot be reached from the start"
  if len(seen) - 1 != dist[goal]:
    return f"the path takes {len(seen) - 1} steps; the shortest takes {dist[goal]}"
  return None


def maze_tokens(text: str) -> np.ndarray:
  """A maze string over ``# SGo`` -> tokens 1..5 (ValueError on another character)."""
  table = {ch: i + 1 for i, ch in enumerate(MAZE_CHARS)}
  try:
    return np.array([table[ch] for ch in text], np.uint8)
  except KeyError as e:
    raise ValueError(f"character {e.args[0]!r} is not one of {MAZE_CHARS!r}") from None


def maze_text(tokens: np.ndarray) -> str:
  """Tokens 1..5 -> the maze string over ``# SGo``."""
  return "".join(MAZE_CHARS[int(t) - 1] for t in np.asarray(tokens).reshape(-1))


# ---------------------------------------------------------------------------------------------
# ARC


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
  """Dihedral transform ``k`` of 8, numbered as HRM's ``dihedral_transform``: 0 identity,
  1..3 rotations by 90/180/270 degrees, 4 left-right flip, 5 up-down flip, 6 transpose,
  7 anti-transpose."""
  ops = (lambda g: g, lambda g: np.rot90(g, 1), lambda g: np.rot90(g, 2),
         lambda g: np.rot90(g, 3), np.fliplr, np.flipud, lambda g: g.T,
         lambda g: np.fliplr(np.rot90(g, 1)))
  return np.ascontiguousarray(ops[k](np.asarray(grid)))


DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)  # dihedral(dihedral(g, k), DIHEDRAL_INVERSE[k]) == g


def arc_tokens(grid: np.ndarray) -> np.ndarray:
  """A colour grid (h, w <= 30) -> the flat 900-token canvas (module docstring)."""
  grid = np.asarray(grid)
  h, w = grid.shape
  canvas = np.zeros((ARC_MAX, ARC_MAX), np.uint8)
  canvas[:h, :w] = grid + 2
  if h < ARC_MAX:
    canvas[h, :w] = ARC_END
  if w < ARC_MAX:
    canvas[:h, w] = ARC_END
  return canvas.reshape(-1)


def arc_grid(tokens: np.ndarray) -> np.ndarray:
  """The colour grid in a 900-token canvas (its extent read along the first row and column)."""
  canvas = np.asarray(tokens).reshape(ARC_MAX, ARC_MAX)
  colour = canvas >= 2
  h = int(np.argmin(colour[:, 0])) if not colour[:, 0].all() else ARC_MAX
  w = int(np.argmin(colour[0])) if not colour[0].all() else ARC_MAX
  return (canvas[:h, :w].astype(np.int64) - 2).astype(np.uint8)


def augment_arc_grids(grids: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
  """One random dihedral transform and colour permutation (0 fixed), the same for all
  ``grids`` (an input and its output, or a whole task)."""
  k = int(rng.integers(8))
  colours = np.concatenate([[0], rng.permutation(9) + 1]).astype(np.uint8)
  return [dihedral(colours[np.asarray(g)], k) for g in grids]


def augment_arc(inputs: np.ndarray, labels: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """``augment_arc_grids`` on the grids of two 900-token canvases, re-encoded."""
  a, b = augment_arc_grids([arc_grid(inputs), arc_grid(labels)], rng)
  return arc_tokens(a), arc_tokens(b)


# ---------------------------------------------------------------------------------------------
# Loaders of the public files


def _read_csv(path: str) -> list[tuple[int, str, str]]:
  """(line number, question, answer) of each row of an HRM puzzle CSV."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot be read ({e})") from None
  if not rows:
    raise ValueError(f"{path}: empty; expected the header {','.join(CSV_HEADER)} and rows")
  header = [h.strip() for h in rows[0]]
  if "question" not in header or "answer" not in header:
    raise ValueError(f"{path}: row 1 (header) is {rows[0]}; expected columns "
                     f"{','.join(CSV_HEADER)} (question and answer are read)")
  q, a = header.index("question"), header.index("answer")
  out = []
  for line, row in enumerate(rows[1:], start=2):
    if len(row) != len(header):
      raise ValueError(f"{path}: row {line} has {len(row)} fields, the header {len(header)}")
    out.append((line, row[q], row[a]))
  if not out:
    raise ValueError(f"{path}: has a header and no rows")
  return out


def load_sudoku_csv(path: str, size: int = 9) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels) tokens, uint8 [rows, size*size], of a Sudoku-Extreme style CSV.

  Every row is checked: lengths, characters (question: ``.`` / ``0`` blank or a digit;
  answer: digits), the answer a solved grid (``check_sudoku``) that agrees with the
  question's givens. ValueError names the file, the row (line number) and the problem.
  """
  sudoku_box(size)
  cells = size * size
  rows = _read_csv(path)
  inputs = np.zeros((len(rows), cells), np.uint8)
  labels = np.zeros((len(rows), cells), np.uint8)
  digits = "".join(str(d) for d in range(1, size + 1))
  for k, (line, question, answer) in enumerate(rows):
    for name, text, allowed in (("question", question, ".0" + digits), ("answer", answer, digits)):
      if len(text) != cells:
        raise ValueError(f"{path}: row {line}: the {name} has {len(text)} characters, not "
                         f"{cells} ({size}x{size})")
      bad = next((ch for ch in text if ch not in allowed), None)
      if bad is not None:
        raise ValueError(f"{path}: row {line}: the {name} has the character {bad!r}; valid: "
                         f"{allowed!r}")
    inputs[k] = np.frombuffer(question.replace(".", "0").encode(), np.uint8) - ord("0")
    labels[k] = np.frombuffer(answer.encode(), np.uint8) - ord("0")
  # Vectorised validity (fast on millions of rows); the first bad row gets check_sudoku's words.
  grids = labels.reshape(-1, size, size).astype(np.int64)
  br, bc = SUDOKU_BOXES[size]
  boxes = grids.reshape(-1, size // br, br, size // bc, bc).transpose(0, 1, 3, 2, 4).reshape(
      -1, size, size)
  want = np.arange(1, size + 1)
  ok = np.ones(len(rows), bool)
  for units in (grids, grids.transpose(0, 2, 1), boxes):
    ok &= (np.sort(units, axis=2) == want).all(axis=(1, 2))
  ok &= ((inputs == 0) | (inputs == labels)).all(axis=1)
  if not ok.all():
    k = int(np.argmin(ok))
    problem = check_sudoku(inputs[k], labels[k], size)
    raise ValueError(f"{path}: row {rows[k][0]}: {problem}")
  return inputs + 1, labels + 1


def load_maze_csv(path: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels) tokens, uint8 [rows, N*N], of a Maze-Hard style CSV (N = ``size``, or
  the square root of the first row's length). Every row is checked (length, characters,
  ``check_maze``); ValueError names the file, the row (line number) and the problem."""
  rows = _read_csv(path)
  if size is None:
    size = int(round(math.sqrt(len(rows[0][1]))))
  cells = size * size
  inputs = np.zeros((len(rows), cells), np.uint8)
  labels = np.zeros((len(rows), cells), np.uint8)
  for k, (line, question, answer) in enumerate(rows):
    for name, text, out in (("question", question, inputs), ("answer", answer, labels)):
      if len(text) != cells:
        raise ValueError(f"{path}: row {line}: the {name} has {len(text)} characters, not "
                         f"{cells} ({size}x{size})")
      try:
        out[k] = maze_tokens(text)
      except ValueError as e:
        raise ValueError(f"{path}: row {line}: the {name}'s {e}") from None
    problem = check_maze(inputs[k], labels[k])
    if problem:
      raise ValueError(f"{path}: row {line}: {problem}")
  return inputs, labels


def _arc_grid(value, where: str) -> np.ndarray:
  if (not isinstance(value, list) or not value
      or not all(isinstance(row, list) and row for row in value)):
    raise ValueError(f"{where} is not a non-empty list of non-empty rows")
  width = len(value[0])
  if any(len(row) != width for row in value):
    raise ValueError(f"{where} is not rectangular (row lengths {sorted({len(r) for r in value})})")
  if len(value) > ARC_MAX or width > ARC_MAX:
    raise ValueError(f"{where} is {len(value)}x{width}; at most {ARC_MAX}x{ARC_MAX}")
  if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9
             for row in value for v in row):
    raise ValueError(f"{where} has a cell that is not a colour 0..9")
  return np.array(value, np.uint8)


def load_arc_task(path: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
  """``{"train": [(input, output), ...], "test": [...]}`` colour grids of one ARC task JSON;
  ValueError naming the file, the pair and the problem."""
  try:
    with open(path, encoding="utf-8") as f:
      task = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot be read as JSON ({e})") from None
  if not isinstance(task, dict) or not isinstance(task.get("train"), list) or not isinstance(
      task.get("test"), list):
    raise ValueError(f"{path}: expected an object with 'train' and 'test' lists of pairs")
  out = {}
  for part in ("train", "test"):
    pairs = []
    for i, pair in enumerate(task[part]):
      where = f"{path}: {part} pair {i}"
      if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
        raise ValueError(f"{where} needs 'input' and 'output' grids")
      pairs.append((_arc_grid(pair["input"], f"{where} input"),
                    _arc_grid(pair["output"], f"{where} output")))
    out[part] = pairs
  return out


def load_arc_dir(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The examples of an ARC-AGI ``data`` folder (``training/*.json``, ``evaluation/*.json``)
  as HRM splits them: ``train`` = every pair of the training tasks and the train pairs of
  the evaluation tasks; ``test`` = the test pairs of the evaluation tasks. Tokens, uint8
  [examples, 900]; tasks in file-name order."""
  parts = {}
  for sub in ("training", "evaluation"):
    folder = os.path.join(path, sub)
    if not os.path.isdir(folder):
      raise ValueError(f"{path}: has no {sub}/ folder of task JSON files (ARC-AGI's data/ "
                       "layout: training/*.json and evaluation/*.json)")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
    if not files:
      raise ValueError(f"{folder}: has no .json task files")
    parts[sub] = [load_arc_task(os.path.join(folder, f)) for f in files]
  train = [p for t in parts["training"] for p in t["train"] + t["test"]]
  train += [p for t in parts["evaluation"] for p in t["train"]]
  test = [p for t in parts["evaluation"] for p in t["test"]]

  def encode(pairs):
    return (np.stack([arc_tokens(i) for i, _ in pairs]),
            np.stack([arc_tokens(o) for _, o in pairs]))

  if not test:
    raise ValueError(f"{path}: the evaluation tasks have no test pairs")
  return {"train": encode(train), "test": encode(test)}


# ---------------------------------------------------------------------------------------------
# Generated datasets (what the TFDS builders store)


def _disjoint_split(draw, num: int, taken: set, what: str, max_tries: int) -> list[dict]:
  out, tries = [], 0
  while len(out) < num:
    if tries >= max_tries:
      raise ValueError(f"{what}: only {len(out)} of {num} test puzzles differ from the train "
                       f"split after {max_tries} draws (too few distinct puzzles of this size); "
                       "ask for fewer examples or a larger size")
    tries += 1
    record, key = draw()
    if key not in taken:
      out.append(record)
  return out


def sudoku_dataset(size: int, givens: int, min_backtracks: int, num_train: int, num_eval: int,
                   seed: int) -> dict[str, list[dict]]:
  """``{"train": records, "test": records}`` of generated Sudokus, deterministic from
  ``seed``; a record is ``{"id", "inputs", "labels" (uint8 tokens [s*s]), "backtracks",
  "givens"}``. Test puzzles whose solution grid is a train puzzle's solution are drawn again
  (train and test are disjoint even at 4x4, which has 288 solved grids)."""
  def draw(rng):
    puzzle, solution, backtracks = generate_sudoku(size, givens, rng, min_backtracks)
    return ({"inputs": sudoku_tokens(puzzle), "labels": sudoku_tokens(solution),
             "backtracks": backtracks, "givens": int((puzzle > 0).sum())}, solution.tobytes())

  return _train_and_test(draw, size, num_train, num_eval, seed, f"{size}x{size} Sudoku")


def maze_dataset(size: int, num_train: int, num_eval: int, seed: int) -> dict[str, list[dict]]:
  """``{"train": records, "test": records}`` of generated mazes, deterministic from ``seed``;
  a record is ``{"id", "inputs", "labels" (uint8 tokens [n*n]), "path_length"}`` (steps of
  the shortest path). Test mazes equal to a train maze are drawn again."""
  def draw(rng):
    inputs, labels = generate_maze(size, rng)
    return ({"inputs": inputs, "labels": labels,
             "path_length": int((labels == MAZE_PATH).sum()) + 1}, inputs.tobytes())

  return _train_and_test(draw, size, num_train, num_eval, seed, f"{size}x{size} maze")


def _train_and_test(draw, size: int, num_train: int, num_eval: int, seed: int,
                    what: str) -> dict[str, list[dict]]:
  """Train records from ``draw(rng)`` (a ``(record, key)`` pair) on stream ``[seed, size,
  0]``, test records on stream ``[seed, size, 1]`` whose key no train record has; ids from 0
  in each split."""
  rng = np.random.default_rng([seed, size, 0])
  train = [draw(rng) for _ in range(num_train)]
  taken = {key for _, key in train}
  test_rng = np.random.default_rng([seed, size, 1])
  test = _disjoint_split(lambda: draw(test_rng), num_eval, taken, what, 20 * num_eval + 1000)
  records = {"train": [r for r, _ in train], "test": test}
  for split in records.values():
    for i, r in enumerate(split):
      r["id"] = i
  return records
