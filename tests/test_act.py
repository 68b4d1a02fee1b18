"""Adaptive Computation Time (``model.act``) against an independent float64 NumPy ACT.

``act_reference`` is Graves (2016) / the Universal Transformer's per-position halting written
out one position at a time: a position runs steps while its summed halting probability stays
at most the threshold (1 - eps), halts at the step that would pass it or at the last step,
weighs in with p while running and with its remainder R = 1 - (sum of earlier p) when it
halts, so its weights sum to 1; the output is Graves' sum_t w_t x_t
(``model.act.update_rule='accumulate'``, the default: what tensor2tensor's UT computes
under its final LayerNorm, checked below) or Scenic's interpolation
``out = x_t w_t + out (1 - w_t)`` (``'interpolate'``), and the ponder cost N + R (N = steps
taken). ``act.act_step`` and the models are checked against it: weights
and output, ponder, halted positions frozen, the never-halting limit equal to fixed depth,
gradients (finite differences), dropout / both encoder_decoder stacks / the train step, and
cached decoding.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import tiny
from xlps import generate, models, train
from xlps.models.controllers import act

THRESHOLD = 0.99


UPDATES = ("interpolate", "accumulate")


def act_reference(ps, xs, threshold=THRESHOLD, update="interpolate"):
  """ACT in float64, one position at a time.

  ``ps`` [N, P] halting probabilities, ``xs`` [N, P, D] step outputs (the block's
  ``transformed``). Returns ``output`` [P, D] (``update``: interpolate, or accumulate =
  sum_t w_t x_t), ``weights`` [N, P],
  ``n_updates`` and ``remainders`` [P], and ``margin``: the smallest distance of a running
  position's summed probability to the threshold before the last step (how far every halting
  decision is from flipping).
  """
  ps, xs = np.asarray(ps, np.float64), np.asarray(xs, np.float64)
  num_steps, num_positions = ps.shape
  weights = np.zeros_like(ps)
  n_updates, remainders = np.zeros(num_positions), np.zeros(num_positions)
  margin = np.inf
  for i in range(num_positions):
    halting = 0.0
    for t in range(num_steps):
      n_updates[i] += 1
      total = halting + ps[t, i]
      if t < num_steps - 1:
        margin = min(margin, abs(total - threshold))
      if total > threshold or t == num_steps - 1:
        remainders[i] = 1.0 - halting
        weights[t, i] = remainders[i]
        break
      weights[t, i] = ps[t, i]
      halting = total
  if update == "accumulate":
    output = np.einsum("tp,tpd->pd", weights, xs)
  else:
    output = np.zeros(xs.shape[1:])
    for t in range(num_steps):
      running = t < n_updates
      output[running] = xs[t, running] * weights[t, running, None] + output[running] * (
          1 - weights[t, running, None])
  return {"output": output, "weights": weights, "n_updates": n_updates,
          "remainders": remainders, "margin": margin}


def run_act_steps(ps, xs, threshold=THRESHOLD, update="interpolate"):
  """``act.act_step`` over N steps (float32): the state after each step."""
  state = act.act_start(jnp.zeros(xs.shape[1:], jnp.float32))
  states = []
  for t in range(ps.shape[0]):
    state = act.act_step(jnp.asarray(ps[t]), state, jnp.asarray(xs[t]),
                            t == ps.shape[0] - 1, threshold, update == "accumulate")
    states.append({k: np.asarray(v) for k, v in vars(state).items() if v is not None})
  return states


def random_ps(seed, num_steps=5, shape=(3, 4)):
  """Halting probabilities in (0, 1), [N, B, L]: each position's p scaled by 0.05 (never
  passes 0.99 in 5 steps: halts at the last), 0.3, 0.6 or 1 (passes it at various steps);
  position (0, 0) passes it at step 0."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([0.05, 0.3, 0.6, 1.0], size=shape)
  ps = rng.uniform(0.001, 1.0, size=(num_steps, *shape)) * scale
  ps[0, 0, 0] = 0.995
  return ps.astype(np.float32)


def flat(a, lead=1):
  """[N, B, L, ...] -> [N, B * L, ...] (``lead`` = leading axes kept)."""
  a = np.asarray(a)
  return a.reshape(*a.shape[:lead], -1, *a.shape[lead + 2:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_t2t_update_under_layernorm_is_the_default_rule(seed):
  """tensor2tensor's UT (the code behind the paper's numbers) updates
  ``transformed * w + previous * 1 - w``: summed, ``sum_t w_t y_t - 1`` per position. Its
  final LayerNorm removes that constant, so LN(t2t) equals LN of the default rule
  (``accumulate``), and not LN of ``interpolate``."""
  from xlps import config as config_lib
  ps = flat(random_ps(seed)).astype(np.float64)
  num_steps = ps.shape[0]
  xs = np.random.default_rng(200 + seed).normal(size=(num_steps, ps.shape[1], 8))
  halting, remainders = np.zeros(ps.shape[1]), np.zeros(ps.shape[1])
  state = np.zeros(xs.shape[1:])
  for t in range(num_steps):  # t2t's loop (halting forced at the last step, as in Graves)
    running = (halting < 1.0).astype(np.float64)
    passes = (halting + ps[t] * running > THRESHOLD) | (t == num_steps - 1)
    new_halted = passes * running
    running = (~passes) * running
    halting += ps[t] * running
    remainders += new_halted * (1 - halting)
    halting += new_halted * remainders
    w = (ps[t] * running + new_halted * remainders)[:, None]
    state = xs[t] * w + state * 1 - w
  layernorm = lambda v: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True))  # noqa: E731
  default = config_lib.act_config().update_rule
  assert default == "accumulate"
  out = {rule: np.asarray(run_act_steps(ps[:, None].astype(np.float32),
                                        xs[:, None].astype(np.float32), update=rule)[-1][
                                            "output"][0], np.float64)
         for rule in UPDATES}
  np.testing.assert_allclose(layernorm(out[default]), layernorm(state), atol=1e-4)
  assert np.abs(layernorm(out["interpolate"]) - layernorm(state)).max() > 0.1


@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_act_step_weights_sum_to_one_and_output_follows_the_update(seed, update):
  """act_step over N steps: each position's weights (p while running, R at its halting step)
  sum to 1 (halting + remainder == 1 at the end, and the reference's weights); the output
  is the float64 reference's (interpolation, or Graves' sum_t w_t x_t, which gives exactly
  1 for transformed = ones). The random p's halt at step 0, at intermediate steps, and at
  the last step only (checked), so every branch of the recurrence is exercised."""
  ps = random_ps(seed)
  num_steps, shape = ps.shape[0], ps.shape[1:]
  xs = np.random.default_rng(100 + seed).normal(size=(num_steps, *shape, 3)).astype(np.float32)
  ref = act_reference(flat(ps), flat(xs), update=update)
  assert ref["margin"] > 1e-5  # float32 and float64 take the same decisions
  np.testing.assert_allclose(ref["weights"].sum(0), 1.0, atol=1e-12)
  steps = set(ref["n_updates"].astype(int))
  assert {1, num_steps} <= steps and len(steps) >= 3, steps

  final = run_act_steps(ps, xs, update=update)[-1]
  assert np.all(final["halted"])
  np.testing.assert_allclose(final["halting"] + final["remainders"], 1.0, atol=1e-6)
  np.testing.assert_allclose(flat(final["output"], 0), ref["output"], atol=1e-5)
  if update == "accumulate":
    ones = run_act_steps(ps, np.ones_like(xs), update=update)[-1]["output"]
    np.testing.assert_allclose(ones, 1.0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_act_step_ponder_and_frozen_positions(seed):
  """act_step's n_updates and remainders (ponder N + R) equal the reference; once a position
  halts, its output and its halting state stay bitwise the same at every later step although
  transformed keeps changing, and its n_updates stops growing."""
  ps = random_ps(seed)
  num_steps, shape = ps.shape[0], ps.shape[1:]
  xs = np.random.default_rng(200 + seed).normal(size=(num_steps, *shape, 3)).astype(np.float32)
  ref = act_reference(flat(ps), flat(xs))
  states = run_act_steps(ps, xs)
  final = states[-1]
  np.testing.assert_array_equal(flat(final["n_updates"], 0), ref["n_updates"])
  np.testing.assert_allclose(flat(final["remainders"], 0), ref["remainders"], atol=1e-6)
  np.testing.assert_allclose(flat(final["n_updates"] + final["remainders"], 0),
                             ref["n_updates"] + ref["remainders"], atol=1e-6)
  halted_at = ref["n_updates"].reshape(shape).astype(int) - 1
  assert (halted_at < num_steps - 1).sum() >= 3
  for t in range(num_steps):
    np.testing.assert_array_equal(states[t]["halted"], halted_at <= t)
    if t:
      halted = halted_at < t   # halted at an earlier step
      for key in ("output", "halting", "remainders", "n_updates"):
        np.testing.assert_array_equal(states[t][key][halted], states[t - 1][key][halted])


# ------------------------------------------------------------------------------ model level


def act_model(family="decoder_lm", num_layers=4, coordinates=True, ponder_weight=0.01,
              update="interpolate", **overrides):
  """The tiny model of ``family`` (max_len 16) with ACT on (threshold 0.99)."""
  config = tiny(family, num_layers, **{"max_len": 16, **overrides})
  config.act.update(enabled=True, coordinates=coordinates, ponder_weight=ponder_weight,
                    update_rule=update)
  return models.spec_of(config)


@functools.cache
def initial_params(family):
  """Initial params of the tiny pre-LN ``family`` with ACT, one (jitted) init per family:
  the decoder_lm is tied (M = 1), so its tree is the same for every depth; the
  encoder_decoder has one slot per stack. Callers copy before changing them."""
  overrides = {"num_decoder_layers": 3} if family == "encoder_decoder" else {}
  spec = act_model(family, 2, **overrides)
  return jax.jit(lambda: nn.unbox(models.init_params(spec)))()


def with_halting(params, seed=2, scale=0.3, bias=0.0):
  """``params`` with every stack's halting unit replaced by ``kernel ~ N(0, scale^2)``,
  ``bias``: larger than at init, so positions halt after different numbers of steps."""
  params = jax.tree.map(lambda a: a, params)
  for owner, tree in params.items():
    if isinstance(tree, dict) and "halting" in tree.get("layers", {}):
      kernel = np.random.default_rng(seed).normal(size=tree["layers"]["halting"]["kernel"].shape)
      tree["layers"]["halting"] = {"kernel": jnp.asarray(kernel * scale, jnp.float32),
                                   "bias": jnp.asarray(bias, jnp.float32)}
  return params


@functools.cache
def unrolled_run(update="interpolate"):
  """A tied post-LN decoder_lm (no final norm: hidden_states is the stack's output) with ACT
  and coordinates, unrolled (scan_layers=False), applied with ``capture_intermediates``: the
  halting unit's p and the block's output at each of the N = 4 steps, the sown ponder, the
  hidden states, and the ponder and hidden states of the scanned model (same params)."""
  spec = act_model(norm_position="post", scan_layers=False, update=update)
  params = {k: v for k, v in initial_params("decoder_lm").items() if k != "final_norm"}
  params = with_halting(params, seed=1, scale=1.0, bias=-1.0)
  batch = models.example_batch(spec, 4, 8)
  _, aux = jax.jit(functools.partial(models.build(spec).apply, capture_intermediates=True,
                                     mutable=["intermediates", "losses"]))(
                                         {"params": params}, batch)
  inter = aux["intermediates"]
  layers = inter["decoder"]["layers"]
  ps = np.stack(layers["halting"]["__call__"])                  # [N, B, L]
  xs = np.stack([out[0] for out in layers["__call__"]])          # [N, B, L, D]
  scanned = act_model(norm_position="post", update=update)
  _, scan_aux = jax.jit(functools.partial(models.build(scanned).apply,
                                          mutable=["intermediates", "losses"]))(
                                              {"params": params}, batch)
  return {"ps": ps, "xs": xs, "ponder": np.asarray(inter["decoder"]["ponder"][0]),
          "loss": np.asarray(aux["losses"]["decoder"]["ponder"][0]),
          "hidden": np.asarray(inter["hidden_states"][0]),
          "scan_ponder": np.asarray(scan_aux["intermediates"]["decoder"]["ponder"][0]),
          "scan_hidden": np.asarray(scan_aux["intermediates"]["hidden_states"][0])}


def test_model_ponder_is_steps_plus_remainder_of_its_halting_probabilities():
  """The sown ponder of each position equals N + R of the float64 reference run on the
  model's own halting probabilities (read per step with capture_intermediates from the
  unrolled stack, so the reference sees exactly what the halting unit produced); its mean
  is losses/ponder, and the scanned stack sows the same ponder."""
  run = unrolled_run()
  ref = act_reference(flat(run["ps"]), flat(run["xs"]))
  assert ref["margin"] > 1e-4
  assert len(set(ref["n_updates"].astype(int))) >= 3   # several halting steps
  want = (ref["n_updates"] + ref["remainders"]).reshape(run["ponder"].shape)
  np.testing.assert_allclose(run["ponder"], want, atol=1e-6)
  np.testing.assert_allclose(run["loss"], want.mean(), atol=1e-6)
  np.testing.assert_allclose(run["scan_ponder"], run["ponder"], atol=1e-6)


@pytest.mark.parametrize("update", UPDATES)
def test_model_output_follows_the_update_of_its_block_outputs(update):
  """The stack's output (hidden_states of a post-LN model) is the reference's output over
  the block outputs x_t with the weights of the model's own p's, unrolled and scanned."""
  run = unrolled_run(update)
  ref = act_reference(flat(run["ps"]), flat(run["xs"]), update=update)
  want = ref["output"].reshape(run["hidden"].shape)
  np.testing.assert_allclose(run["hidden"], want, atol=1e-5)
  np.testing.assert_allclose(run["scan_hidden"], want, atol=1e-5)


def test_halted_positions_are_unchanged_by_more_steps():
  """A tied (M = 1) decoder_lm run with at most N = 4 and N + 2 = 6 steps (one param tree):
  each position that halted before the last step of the short run (ponder <= N, i.e.
  n_updates < N) has bitwise-equal logits and ponder in the long run; the positions forced
  to halt at step N do run on (their logits change), so the comparison can tell."""
  short, long = act_model(num_layers=4), act_model(num_layers=6)
  params = with_halting(initial_params("decoder_lm"), seed=3, scale=0.3, bias=-1.0)
  batch = models.example_batch(short, 4, 8)
  out = {}
  for name, spec in (("short", short), ("long", long)):
    logits, aux = models.build(spec).apply({"params": params}, batch,
                                           mutable=["intermediates"])
    out[name] = np.asarray(logits), np.asarray(aux["intermediates"]["decoder"]["ponder"][0])
  (short_logits, short_ponder), (long_logits, long_ponder) = out["short"], out["long"]
  early = short_ponder <= 4
  assert 0 < early.sum() < early.size, short_ponder
  np.testing.assert_array_equal(long_logits[early], short_logits[early])
  np.testing.assert_array_equal(long_ponder[early], short_ponder[early])
  assert np.all(long_ponder[~early] > 4)
  assert not np.allclose(long_logits[~early], short_logits[~early], atol=1e-4)


def halting_removed(params):
  """``params`` without the halting units (the fixed-depth model's tree)."""
  return {owner: ({**tree, "layers": {k: v for k, v in tree["layers"].items()
                                      if k != "halting"}} if "layers" in tree else tree)
          for owner, tree in params.items()}


@pytest.mark.parametrize("family,num_layers", [("decoder_lm", 3), ("encoder_decoder", 2)])
def test_never_halting_equals_fixed_depth(family, num_layers):
  """With every halting bias at -1e4 (p == 0 in float32) and no coordinates, ACT takes all N
  steps and weighs only the last (R = 1): the logits equal the fixed-depth model with the
  same params minus the halting units (act.enabled=False), and ponder is N + 1 exactly at
  every position of every stack."""
  overrides = {"num_decoder_layers": 3} if family == "encoder_decoder" else {}
  spec = act_model(family, num_layers, coordinates=False, **overrides)
  fixed = models.spec_of(tiny(family, num_layers, max_len=16, **overrides))
  params = jax.tree.map(lambda p: p * 4.0, initial_params(family))
  stacks = [owner for owner, tree in params.items() if "halting" in tree.get("layers", {})]
  assert len(stacks) == (2 if family == "encoder_decoder" else 1)
  for owner in stacks:
    params[owner]["layers"]["halting"]["bias"] = jnp.float32(-1e4)
  batch = models.example_batch(spec, 2, 8)

  @jax.jit
  def run(params):
    return (models.build(spec).apply({"params": params}, batch, mutable=["intermediates"]),
            models.build(fixed).apply({"params": halting_removed(params)}, batch))

  (logits, aux), want = run(params)
  np.testing.assert_array_equal(logits, want)
  depth = {"encoder": num_layers, "decoder": overrides.get("num_decoder_layers", num_layers)}
  for owner in stacks:
    ponder = aux["intermediates"][owner]["ponder"][0]
    np.testing.assert_array_equal(ponder, np.full(ponder.shape, depth[owner] + 1.0))


# ------------------------------------------------------------------------------- gradients


TOY = dict(steps=4, positions=4, dim=3, tau=0.5, seed=15)


def toy_inputs():
  """The toy stack's input state, layer weight W, halting unit (w_h, b_h) and loss weights C
  (seed 15: positions halt after 2, 3 and 4 steps, every decision >= 0.03 from flipping)."""
  rng = np.random.default_rng(TOY["seed"])
  s0 = rng.normal(size=(TOY["positions"], TOY["dim"]))
  w = rng.normal(size=(TOY["dim"], TOY["dim"]))
  w_h = rng.normal(size=TOY["dim"]) * 1.5
  c = rng.normal(size=(TOY["positions"], TOY["dim"]))
  return s0, c, {"w": w, "w_h": w_h, "b_h": np.float64(-0.5)}


def toy_reference(s0, c, params, update="interpolate"):
  """Float64 NumPy: p_t = sigmoid(s_t w_h + b_h), x_t = tanh(s_t W), s_{t+1} = x_t; loss =
  sum(output * C) + tau * mean(N + R) with ``act_reference``; also its decision margin."""
  s, ps, xs = s0, [], []
  for _ in range(TOY["steps"]):
    ps.append(1.0 / (1.0 + np.exp(-(s @ params["w_h"] + params["b_h"]))))
    s = np.tanh(s @ params["w"])
    xs.append(s)
  ref = act_reference(np.stack(ps), np.stack(xs), update=update)
  ponder = ref["n_updates"] + ref["remainders"]
  return (ref["output"] * c).sum() + TOY["tau"] * ponder.mean(), ref


def toy_jax_loss(params, s0, c, update="interpolate"):
  """The same loss with ``act.act_step`` in float32, one Python step at a time."""
  s = s0
  state = act.act_start(s0)
  for t in range(TOY["steps"]):
    p = jax.nn.sigmoid(s @ params["w_h"] + params["b_h"])
    s = jnp.tanh(s @ params["w"])
    state = act.act_step(p, state, s, t == TOY["steps"] - 1, THRESHOLD,
                         update == "accumulate")
  ponder = state.n_updates + state.remainders
  return (state.output * c).sum() + TOY["tau"] * ponder.mean()


@pytest.mark.parametrize("update", UPDATES)
def test_gradients_match_finite_differences_of_the_reference(update):
  """d loss / d(W, w_h, b_h) through act_step (float32, jax.grad) equals central finite
  differences (eps 1e-6) of the float64 reference, rtol 1e-3. Every halting decision is at
  least 1e-3 from the threshold (asserted), so the perturbations never flip one and the
  loss is smooth there; the positions halt at different steps, one only at the last."""
  s0, c, params = toy_inputs()
  loss, ref = toy_reference(s0, c, params, update)
  assert ref["margin"] > 1e-3
  assert set(ref["n_updates"].astype(int)) >= {2, 3, TOY["steps"]}
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  jax_loss, grads = jax.jit(jax.value_and_grad(functools.partial(
      toy_jax_loss, update=update)))(jax.tree.map(f32, params), f32(s0), f32(c))
  np.testing.assert_allclose(jax_loss, loss, rtol=1e-5)
  eps = 1e-6
  for name, value in params.items():
    fd = np.zeros(np.shape(value))
    for index in np.ndindex(fd.shape):
      bumped = []
      for sign in (1, -1):
        moved = np.array(value, np.float64)
        moved[index] += sign * eps
        bumped.append(toy_reference(s0, c, {**params, name: moved}, update)[0])
      fd[index] = (bumped[0] - bumped[1]) / (2 * eps)
    assert np.abs(fd).max() > 1e-2, name
    np.testing.assert_allclose(grads[name], fd, rtol=1e-3, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ training and decoding


def with_weights(spec, batch_size=2, length=8):
  """``models.example_batch`` plus targets (a decoder_lm predicts its inputs shifted by one,
  here any tokens will do) and loss weights of 1."""
  batch = models.example_batch(spec, batch_size, length)
  targets = batch.get("targets", jnp.roll(batch["inputs"], -1, axis=1))
  return {**batch, "targets": targets, "weights": jnp.ones(targets.shape, jnp.float32)}


def test_dropout_and_both_encoder_decoder_stacks():
  """encoder_decoder with ACT in train mode (dropout and attention dropout on, rngs given):
  both the encoder and the decoder stack sow a ponder in [1, N + 1] and its mean as a loss;
  train.apply_model returns their sum and the same logits; dropout does change the logits."""
  spec = act_model("encoder_decoder", 2, dropout_rate=0.1, attention_dropout_rate=0.1,
                   num_decoder_layers=3)
  params = initial_params("encoder_decoder")
  batch = with_weights(spec)
  model = models.build(spec)

  @jax.jit
  def run(params):
    rngs = {"dropout": jax.random.PRNGKey(3)}
    logits, aux = model.apply({"params": params}, batch, deterministic=False, rngs=rngs,
                              mutable=["intermediates", "losses"])
    return (logits, aux, train.apply_model(model, params, batch, deterministic=False, rngs=rngs),
            model.apply({"params": params}, batch))

  logits, aux, (summed_logits, extras), plain = run(params)
  assert set(aux["losses"]) == {"encoder", "decoder"}
  total = 0.0
  for owner, depth in (("encoder", 2), ("decoder", 3)):
    ponder = np.asarray(aux["intermediates"][owner]["ponder"][0])
    assert ponder.shape == (2, 8)
    assert np.all((ponder >= 1) & (ponder <= depth + 1))
    loss = aux["losses"][owner]["ponder"][0]
    np.testing.assert_allclose(loss, ponder.mean(), rtol=1e-6)
    total += loss
  np.testing.assert_allclose(extras["ponder"], total, rtol=1e-6)
  np.testing.assert_allclose(summed_logits, logits, atol=1e-6)
  assert not np.allclose(plain, logits, atol=1e-3)


def test_train_step_adds_tau_times_ponder_to_the_loss():
  """train.train_step on a decoder_lm with ACT and ponder_weight 0.5, through train.state_of
  with SGD at learning rate 1 (params - new params is the gradient; make_optimizer's AdamW
  would normalise it away): metrics["ponder"] is apply_model's ponder, and the step's
  gradient is d(cross-entropy) + 0.5 * d(ponder) (both from one jacobian), with d(ponder)
  far from 0. The loss itself is not returned; this is its tau * ponder term (ponder_weight
  0 would give d(cross-entropy) alone)."""
  spec = act_model(num_layers=3, ponder_weight=0.5)
  model = models.build(spec)
  batch = with_weights(spec)
  optimizer = optax.sgd(1.0)
  state = train.state_of(initial_params("decoder_lm"), optimizer, seed=0)

  @jax.jit
  def run(state):
    key = jax.random.fold_in(state.rng, state.step)

    def terms(params):  # [cross-entropy, ponder] as the step's train-mode apply sees them
      logits, extras = train.apply_model(model, params, batch, deterministic=False,
                                         rngs={"dropout": key})
      loss = train.loss_and_metrics(logits, batch["targets"], batch["weights"])[0]
      return jnp.stack([loss, extras["ponder"]])

    return (train.train_step(state, batch, model=model, optimizer=optimizer),
            terms(state.params), jax.jacrev(terms)(state.params))

  (new_state, metrics), (cross_entropy, ponder), jacobian = run(state)
  assert int(new_state.step) == 1
  np.testing.assert_allclose(metrics["ponder"], ponder, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss_sum"] / metrics["tokens"], cross_entropy, rtol=1e-6)
  assert 1 <= ponder <= 4
  grads = jax.tree.map(lambda old, new: old - new, state.params, new_state.params)
  ponder_grads = jax.tree.map(lambda j: j[1], jacobian)
  assert optax.tree.norm(ponder_grads) > 1e-2
  jax.tree.map(lambda g, j: np.testing.assert_allclose(g, j[0] + 0.5 * j[1], atol=1e-5),
               grads, jacobian)


def test_cached_decoding_equals_full_recomputation():
  """LMGenerator (left-padded prompts of lengths 6, 2 and 4, 4 new tokens, K/V cache along
  depth) on a decoder_lm with ACT and coordinates: the logits each token was chosen from
  equal those of one forward pass without cache over prompt + generated tokens (1e-5, as
  tests/test_generate.py's lm_reference; right padding, which a causal model never reads),
  with positions of that pass halting after different numbers of steps (checked)."""
  spec = act_model(num_layers=4)
  params = jax.tree.map(lambda p: p * 4.0, initial_params("decoder_lm"))
  params = with_halting(params, seed=3, scale=0.3, bias=-1.0)
  prompts, new = [[5, 6, 7, 8, 9, 10], [11, 12], [3, 4, 5, 6]], 4
  out = generate.LMGenerator(spec, new, eos_id=-1, return_logits=True)(params, prompts)
  seqs = np.zeros((len(prompts), 6 + new), np.int32)
  for row, prompt in enumerate(prompts):
    seqs[row, :len(prompt) + new] = list(prompt) + list(np.asarray(out.tokens[row]))
  logits, aux = models.build(spec).apply({"params": params}, {"inputs": jnp.asarray(seqs)},
                                         mutable=["intermediates"])
  want = np.stack([logits[row, len(p) - 1:len(p) - 1 + new] for row, p in enumerate(prompts)])
  np.testing.assert_allclose(out.logits, want, atol=1e-5, rtol=1e-5)
  ponder = np.asarray(aux["intermediates"]["decoder"]["ponder"][0])
  steps = np.ceil(ponder) - 1
  real = seqs != 0
  assert len(set(steps[real].astype(int))) >= 2, steps


def test_ponder_loss_counts_real_positions_only():
  """losses/ponder is the mean of N + R over non-pad positions (segment_ids != 0; an
  encoder-decoder's source != 0 and target != 0), not over padding."""
  spec = act_model()
  params = with_halting(initial_params("decoder_lm"), seed=3, scale=0.3, bias=-1.0)
  batch = models.example_batch(spec, 2, 8)
  batch["segment_ids"] = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])
  _, aux = models.build(spec).apply({"params": params}, batch,
                                    mutable=["intermediates", "losses"])
  ponder = np.asarray(aux["intermediates"]["decoder"]["ponder"][0])
  real = np.asarray(batch["segment_ids"]) != 0
  np.testing.assert_allclose(aux["losses"]["decoder"]["ponder"][0], ponder[real].mean(),
                             rtol=1e-6)
  assert not np.isclose(ponder[real].mean(), ponder.mean())


def test_no_config_key_is_a_configdict_attribute():
  """A key named like a ConfigDict attribute (``update``, ``get``, ``items`` ...) cannot be
  set from the command line: the flag library reaches the method instead."""
  import ml_collections
  from xlps import config as config_lib
  reserved = set(dir(ml_collections.ConfigDict))

  def keys(node, prefix=""):
    for key in node:
      yield prefix + key, key
      if isinstance(node[key], ml_collections.ConfigDict):
        yield from keys(node[key], f"{prefix}{key}.")

  clashes = [path for path, key in keys(config_lib.base_config()) if key in reserved]
  assert not clashes, clashes


def test_saved_runs_keep_the_act_rule_they_trained_with():
  """Runs saved with the old key ``model.act.update`` (or before it existed, when the rule
  was the interpolation) restore with that rule under ``update_rule``; resuming one with
  another rule is a named model difference, and with ACT off the key is moot."""
  from xlps import checkpoint
  from xlps import config as config_lib
  old = config_lib.model_config().to_dict()
  old["act"].pop("update_rule")
  old["act"]["update"] = "interpolate"
  assert config_lib.from_saved({"model": old}).model.act.update_rule == "interpolate"
  del old["act"]["update"]
  assert config_lib.from_saved({"model": old}).model.act.update_rule == "interpolate"
  current = config_lib.model_config()
  assert checkpoint.model_differences(old, current) == []
  old["act"]["enabled"] = current.act.enabled = True
  assert checkpoint.model_differences(old, current) == [
      "model.act.update_rule: checkpoint 'interpolate', config 'accumulate'"]
  current.act.update_rule = "interpolate"
  assert checkpoint.model_differences(old, current) == []


def test_act_threshold_one_is_valid():
  """The halting threshold's valid range is (0, 1]: 1.0 (halt only at the last step unless
  the sum passes 1) is accepted; 0 is refused (tests/test_bad_input.py)."""
  config = tiny("decoder_lm", 4)
  config.act.update(enabled=True, threshold=1.0)
  assert models.spec_of(config).act.threshold == 1.0
