"""Recursive reasoning on puzzles: TRM / HRM latent recursion with deep supervision.

TRM (Jolicoeur-Martineau 2025, "Less is More: Recursive Reasoning with Tiny Networks"):
one 2-layer post-norm net, latent updates ``z <- net(z + y + x)`` n = 6 times then
``y <- net(y + z)``, T = 3 cycles per supervision step (the first two without gradient),
up to N_sup = 16 supervision steps with a BCE halting head, EMA 0.999, stablemax
cross-entropy, AdamW (b2 0.95, weight decay 1.0, lr 1e-4, 2000 warmup updates, then
constant). HRM (Wang et al. 2025) is the same code with two nets (L for z, H for y), the
one-step gradient and Q-learning halting. Sizes follow TRM's Sudoku-Extreme attention
variant (d_model 512, 8 heads, SwiGLU 4x, no biases); the paper trains on 1k puzzles with
augmentation for 50k epochs at batch 768, far beyond a CPU.

    python -m launch.train --config=configs/puzzle.py --workdir=/tmp/trm_sudoku
    python -m launch.train --config=configs/puzzle.py:variant=hrm --workdir=/tmp/hrm_sudoku
    python -m launch.train --config=configs/puzzle.py:size=6,runlocal --workdir=/tmp/trm6
    # the real Sudoku-Extreme (HRM's CSVs: train.csv / test.csv in one folder):
    python -m launch.train --config=configs/puzzle.py:files=sudoku_csv \
        --config.data.puzzle_dir=/data/sudoku-extreme --config.data.puzzle_subsample=1000 \
        --workdir=/tmp/trm_sudoku_extreme

Arguments (``key=value`` or bare flags, comma-separated):

* ``puzzle``: ``sudoku`` (generated locally; ``size`` 4, 6 or 9) or ``maze`` (``size`` =
  side); ``files=sudoku_csv | maze_csv | arc`` reads the public files from
  ``data.puzzle_dir`` instead (HRM's Sudoku-Extreme / Maze-Hard CSVs, ARC-AGI JSON).
* ``variant``: ``trm`` (default), ``one_step`` (TRM with HRM's one-step gradient), ``hrm``
  (separate L / H nets, one-step gradient, Q-learning halting), ``plain`` (no recursion:
  the net once, one update per batch: TRM's 2 layers at equal parameters) or ``deep``
  (no recursion: an unshared net of T (n + 1) x 2 layers, TRM's applied depth per
  supervision step).
* ``runlocal``: a CPU-sized model (d_model 64, 2 heads, T = 2, n = 2, N_sup = 4, 200 steps).
"""

import ml_collections

from xlps import config as config_lib

VARIANTS = ("trm", "one_step", "hrm", "plain", "deep")
FILE_VOCAB = {"sudoku_csv": 11, "maze_csv": 6, "arc": 12}
FILE_SIZE = {"sudoku_csv": 9, "maze_csv": 30, "arc": 30}
GIVENS = {4: 5, 6: 12, 9: 30}   # generated Sudoku: givens per size (4x4 needs >= 4, 6x6 >= 8)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, puzzle="sudoku", size=9, variant="trm", files="",
                             runlocal=False)
  if arg.variant not in VARIANTS:
    raise ValueError(f"configs/puzzle.py variant={arg.variant!r} is unknown; valid: "
                     f"{', '.join(VARIANTS)}")
  config = config_lib.base_config()
  d = config.data
  d.tokenizer = "none"
  if arg.files:
    d.name, d.puzzle_format, size = "puzzle_files", arg.files, FILE_SIZE.get(arg.files, 0)
    vocab = FILE_VOCAB.get(arg.files, 0)
    d.augment = arg.files != "maze_csv"
  else:
    d.name, size = arg.puzzle, arg.size
    vocab = size + 2 if arg.puzzle == "sudoku" else 6
    d.augment = arg.puzzle == "sudoku"
  d.puzzle_size = size
  d.puzzle_givens = GIVENS.get(size, 30)
  d.seq_len = size * size
  d.num_train_examples, d.num_eval_examples = 1000, 1000  # TRM: 1k training puzzles
  d.eval_batches = 0                                       # the whole test split

  m = config.model
  m.family = "puzzle"
  m.vocab_size = vocab
  m.d_model, m.num_heads, m.d_ff = 512, 8, 2048
  m.activation = "swiglu"
  m.norm = "rmsnorm"
  m.norm_position = "post"
  m.norm_eps = 1e-5
  m.use_bias = False
  m.tie_embeddings = False
  m.max_len = d.seq_len
  r = m.recursion
  r.net_layers, r.latent_steps, r.cycles, r.supervision_steps = 2, 6, 3, 16
  if arg.variant == "one_step":
    r.gradient = "one_step"
  elif arg.variant == "hrm":
    r.latent_steps, r.cycles = 2, 2    # HRM: H_cycles = L_cycles = 2 (4 layers per net)
    r.net_layers, r.separate_nets = 4, True
    r.gradient, r.halting = "one_step", "q_learning"

  t = config.train
  t.loss = "stablemax_cross_entropy"
  t.ema_decay = 0.999
  t.learning_rate = 1e-4
  t.weight_decay = 1.0
  t.b1, t.b2 = 0.9, 0.95
  t.end_lr_factor = 1.0                # constant after warmup (TRM's lr_min_ratio 1.0)
  t.warmup_steps = 2000                # optimizer updates (up to N_sup per train step)
  t.batch_size = 768
  t.num_steps = 20000
  t.decay_steps = t.num_steps          # the warmup counts updates, not batches
  t.log_every_steps = 100
  t.eval_every_steps = 2000
  t.checkpoint_every_steps = 2000
  if arg.runlocal:
    m.d_model, m.num_heads, m.d_ff = 64, 2, 256
    r.latent_steps, r.cycles, r.supervision_steps = 2, 2, 4
    # 4x4 has only 288 solved grids: 200 train puzzles leave 128 test grids unseen.
    d.num_train_examples, d.num_eval_examples = (200, 128) if size == 4 else (1000, 256)
    t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps = 64, 200, 1e-3, 50
    t.weight_decay, t.ema_decay = 0.1, 0.99
    t.decay_steps = t.num_steps
    t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 20, 100, 100
  # TRM's init: N(0, 1/d) weights and embeddings (LeCun), the input embedding scaled by
  # sqrt(d / 2) in the model (PuzzleNet), so that it weighs like the post-norm y and z.
  m.init_std = m.d_model ** -0.5
  if arg.variant in ("plain", "deep"):
    applied = r.cycles * (r.latent_steps + 1) * r.net_layers
    m.recursion = config_lib.recursion_config()
    m.num_layers = 2 if arg.variant == "plain" else applied
    m.sharing = config_lib.sharing_config(num_unique=m.num_layers, order="sequence")
  else:
    m.num_layers = r.cycles * (r.latent_steps + 1) * r.net_layers
  return config
