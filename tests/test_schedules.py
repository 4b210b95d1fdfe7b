from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprompt import schedules as S

torch = pytest.importorskip("torch")

STAGE1 = dict(base_lr=3.5e-4, lr_min=1e-6, warmup_t=5, warmup_lr_init=1e-5)


# ----------------------------------------------------------------------------- spec tables


@pytest.mark.parametrize("T", [60, 120])
def test_clipreid_stage1_spec_values(T):
  lr = functools.partial(S.timm_cosine, t_initial=T, **STAGE1)
  for e, v in [(1, 7.80e-5), (2, 1.46e-4), (3, 2.14e-4), (4, 2.82e-4)]:
    assert lr(e) == pytest.approx(v, rel=2e-3)
  assert lr(5) == pytest.approx({60: 3.441e-4, 120: 3.485e-4}[T], rel=3e-4)
  assert lr(T // 2) == pytest.approx(1.755e-4, rel=1e-3)
  assert lr(T - 1) == pytest.approx({60: 1.2e-6, 120: 1.06e-6}[T], rel={60: 0.05, 120: 5e-3}[T])
  assert lr(T) == pytest.approx(1.0e-6, rel=1e-9)
  # Formulas as the spec writes them, for every epoch.
  for e in range(1, T + 1):
    if e < 5:
      want = 1e-5 + e * (3.5e-4 - 1e-5) / 5
    elif e < T:
      want = 1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + np.cos(np.pi * e / T))
    else:
      want = 1e-6
    assert lr(e) == pytest.approx(want, rel=1e-12)


def test_clipreid_stage2_spec_multipliers():
  vit = functools.partial(S.warmup_multistep, base_lr=1.0, milestones=[30, 50], gamma=0.1,
                          warmup_factor=0.1, warmup_iters=10)
  assert [round(vit(e), 6) for e in range(1, 10)] == [0.19, 0.28, 0.37, 0.46, 0.55, 0.64,
                                                       0.73, 0.82, 0.91]
  assert all(vit(e) == pytest.approx(1.0) for e in range(10, 30))
  assert all(vit(e) == pytest.approx(0.1) for e in range(30, 50))
  assert all(vit(e) == pytest.approx(0.01) for e in range(50, 61))
  assert vit(0) == pytest.approx(0.1)  # the paper's "from 5e-7" with base 5e-6

  cnn = functools.partial(S.warmup_multistep, base_lr=1.0, milestones=[40, 70], gamma=0.1,
                          warmup_factor=0.01, warmup_iters=10)
  assert [round(cnn(e), 6) for e in range(1, 10)] == [0.109, 0.208, 0.307, 0.406, 0.505, 0.604,
                                                       0.703, 0.802, 0.901]
  assert all(cnn(e) == pytest.approx(1.0) for e in range(10, 40))
  assert all(cnn(e) == pytest.approx(0.1) for e in range(40, 70))
  assert all(cnn(e) == pytest.approx(0.01) for e in range(70, 121))


def test_lpt_spec_values():
  E = 90
  lr = functools.partial(S.lpt_cosine, base_lr=0.02, epochs=E)
  assert lr(0) == pytest.approx(1e-6, rel=1e-12)
  for e in range(1, E):
    assert lr(e) == pytest.approx(0.02 * 0.5 * (1 + np.cos(np.pi * e / E)), rel=1e-12)


# ----------------------------------------------------------------------------- vs torch


def _opt(lr):
  return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("T", [60, 120])
def test_stage1_matches_timm(T):
  from timm.scheduler import CosineLRScheduler
  opt = _opt(3.5e-4)
  sched = CosineLRScheduler(opt, t_initial=T, lr_min=1e-6, cycle_mul=1.0, cycle_decay=0.1,
                            warmup_lr_init=1e-5, warmup_t=5, cycle_limit=1, t_in_epochs=True)
  for e in range(1, T + 5):  # past T too: the cycle limit holds lr_min
    sched.step(e)  # CLIP-ReID: at the start of epoch e
    want = opt.param_groups[0]["lr"]
    assert S.timm_cosine(e, t_initial=T, **STAGE1) == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("E,warm", [(90, 1), (20, 3)])
def test_lpt_matches_timm(E, warm):
  from timm.scheduler import CosineLRScheduler
  opt = _opt(0.02)
  sched = CosineLRScheduler(opt, t_initial=E, warmup_t=warm, warmup_lr_init=1e-6,
                            cycle_decay=0.1)
  for e in range(E):
    want = opt.param_groups[0]["lr"]  # lr in force during 0-based epoch e
    got = S.lpt_cosine(e, base_lr=0.02, epochs=E, warmup_epochs=warm)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15), e
    sched.step(e + 1)


class _TorchWarmupMultiStep(torch.optim.lr_scheduler.LRScheduler):
  """WarmupMultiStepLR semantics written out for torch, as the CLIP-ReID recipe steps it."""

  def __init__(self, opt, milestones, gamma, warmup_factor, warmup_iters, method):
    self.milestones, self.gamma = list(milestones), gamma
    self.warmup_factor, self.warmup_iters, self.method = warmup_factor, warmup_iters, method
    super().__init__(opt)

  def get_lr(self):
    e = self.last_epoch
    w = 1.0
    if e < self.warmup_iters:
      if self.method == "constant":
        w = self.warmup_factor
      else:
        a = e / self.warmup_iters
        w = self.warmup_factor * (1 - a) + a
    n = sum(1 for m in self.milestones if m <= e)
    return [b * w * self.gamma ** n for b in self.base_lrs]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("ms,f,E,method", [([30, 50], 0.1, 60, "linear"),
                                           ([40, 70], 0.01, 120, "linear"),
                                           ([5, 8], 0.5, 12, "constant")])
def test_stage2_matches_torch(ms, f, E, method):
  opt = _opt(5e-6)
  sched = _TorchWarmupMultiStep(opt, ms, 0.1, f, 10, method)
  for e in range(1, E + 1):
    sched.step()  # start of epoch e: last_epoch = e
    want = opt.param_groups[0]["lr"]
    got = S.warmup_multistep(e, base_lr=5e-6, milestones=ms, warmup_factor=f, warmup_iters=10,
                             warmup_method=method)
    assert got == pytest.approx(want, rel=1e-12), e


# ----------------------------------------------------------------------------- optax form


def test_per_epoch_jit_and_table():
  fn = functools.partial(S.timm_cosine, t_initial=60, **STAGE1)
  spe = 7
  sched = S.per_epoch(fn, spe, first_epoch=1)
  tabled = S.per_epoch(fn, spe, first_epoch=1, num_epochs=60)
  steps = jnp.arange(60 * spe)
  got = np.asarray(jax.jit(jax.vmap(sched))(steps))
  got_t = np.asarray(jax.jit(jax.vmap(tabled))(steps))
  want = np.array([fn(1 + s // spe) for s in range(60 * spe)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_t, want, rtol=1e-6)
  assert float(sched(0)) == pytest.approx(7.8e-5, rel=1e-6)
  assert float(sched(spe - 1)) == float(sched(0)) and float(sched(spe)) != float(sched(0))
  # Past the table the last epoch's value holds.
  assert float(tabled(10_000)) == pytest.approx(fn(60), rel=1e-6)

  stage2 = S.per_epoch(functools.partial(S.warmup_multistep, base_lr=5e-6, milestones=[30, 50],
                                         warmup_factor=0.1, warmup_iters=10), 3)
  got = np.asarray(jax.jit(jax.vmap(stage2))(jnp.arange(180)))
  want = [S.warmup_multistep(1 + s // 3, base_lr=5e-6, milestones=[30, 50], warmup_factor=0.1,
                             warmup_iters=10) for s in range(180)]
  np.testing.assert_allclose(got, want, rtol=2e-6)

  lpt = S.per_epoch(functools.partial(S.lpt_cosine, base_lr=0.02, epochs=90), 245, first_epoch=0)
  assert float(lpt(244)) == pytest.approx(1e-6, rel=1e-6)
  assert float(lpt(245)) == pytest.approx(0.01 * (1 + np.cos(np.pi / 90)), rel=1e-6)


def test_per_epoch_in_optimizer():
  from jaxprompt import optim
  params = {"prompt": {"ctx": jnp.ones((3,))}}
  lr = S.per_epoch(lambda e: 0.1 * e, 2, first_epoch=1)
  tx = optim.make_optimizer(params, [(".*", optim.Rule())], name="sgd", learning_rate=lr)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
  lrs = []
  for _ in range(5):
    u, state = step(params, state)
    lrs.append(-float(u["prompt"]["ctx"][0]))
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.2, 0.2, 0.3], rtol=1e-6)
