from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxprompt import optim
from jaxprompt.optim import FREEZE, Rule

torch = pytest.importorskip("torch")

SHAPES = {
    "img": {
        "blocks_0": {"attn": {"qkv": {"kernel": (4, 6), "bias": (6,)}},
                     "ln": {"scale": (4,), "bias": (4,)}},
        "cls": (1, 4),
    },
    "txt": {"emb": (5, 3), "ln": {"bias": (3,)}},
    "prompt": {"ctx": (2, 4)},
    "head": {"kernel": (4, 3), "bias": (3,)},
}

RULES = [
    ("txt/.*", FREEZE),                          # before '.*bias' so txt biases stay frozen
    (".*bias", Rule(lr_mult=2.0)),
    ("img/.*/ln/scale", Rule(wd_mult=0.0)),
    ("prompt/.*", Rule(lr_mult=0.5, wd_mult=0.0)),
    (".*", Rule()),
]


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return optim._like(SHAPES, lambda n, s: rng.normal(size=s).astype(np.float32))


def flat(tree):
  return dict(optim._items(tree))


def test_names_resolve_first_match():
  params = make_params()
  names = optim.param_names(params)
  assert "img/blocks_0/attn/qkv/kernel" in names and len(names) == 10
  res = optim.resolve(params, RULES)
  assert res["txt/ln/bias"] == FREEZE  # first match wins over '.*bias'
  assert res["head/bias"].lr_mult == 2.0
  assert res["img/blocks_0/ln/scale"].wd_mult == 0.0
  assert res["img/cls"] == Rule()
  # Reversed order: '.*' swallows everything.
  res2 = optim.resolve(params, list(reversed(RULES)))
  assert all(r == Rule() for r in res2.values())


def test_uncovered_and_bad_rules():
  params = make_params()
  with pytest.raises(ValueError) as e:
    optim.resolve(params, [("img/.*", Rule()), ("prompt/.*", Rule())])
  msg = str(e.value)
  for n in ["txt/emb", "txt/ln/bias", "head/kernel", "head/bias"]:
    assert n in msg
  assert "4 parameter(s)" in msg
  with pytest.raises(ValueError) as e:
    optim.resolve(params, [("img/(", Rule()), ("/txt/.*", FREEZE), ("x", None), (".*", Rule())])
  msg = str(e.value)
  assert "bad regex 'img/('" in msg and "leading '/'" in msg and "expected a Rule" in msg
  # fullmatch, not search: 'bias' alone covers nothing.
  with pytest.raises(ValueError, match="head/bias"):
    optim.resolve({"head": {"bias": 0.0}}, [("bias", Rule())])


def test_split_merge_roundtrip():
  params = make_params()
  tr, fr = optim.split(params, RULES)
  assert set(fr) == {"txt"} and "txt" not in tr
  assert set(optim.param_names(fr)) == {"txt/emb", "txt/ln/bias"}
  assert len(optim.param_names(tr)) == 8
  back = optim.merge(tr, fr)
  assert sorted(optim.param_names(back)) == sorted(optim.param_names(params))
  for n, v in flat(params).items():
    assert flat(back)[n] is v
  with pytest.raises(ValueError, match="both"):
    optim.merge(tr, tr)
  # Works under jit too (jax returns dicts with sorted keys, hence the sets).
  tr2, fr2 = jax.jit(lambda p: optim.split(p, RULES))(params)
  assert set(optim.param_names(tr2)) == set(optim.param_names(tr))
  assert set(optim.param_names(fr2)) == set(optim.param_names(fr))


def test_make_optimizer_rejects_frozen_and_unknown():
  params = make_params()
  with pytest.raises(ValueError, match="txt/emb"):
    optim.make_optimizer(params, RULES, name="adam", learning_rate=1e-3)
  tr, _ = optim.split(params, RULES)
  with pytest.raises(TypeError, match="unknown hparams"):
    optim.make_optimizer(tr, RULES, name="adam", learning_rate=1e-3, betaz=(0.9, 0.99))
  with pytest.raises(ValueError, match="empty"):
    optim.make_optimizer({}, RULES, name="adam", learning_rate=1e-3)
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.make_optimizer(tr, RULES, name="lamb", learning_rate=1e-3)


def _torch_opt(name, tparams, resolved, lr, wd, hp):
  groups = [{"params": [p], "lr": lr * resolved[n].lr_mult,
             "weight_decay": wd * resolved[n].wd_mult, "mult": resolved[n].lr_mult}
            for n, p in tparams.items()]
  if name == "adam":
    return torch.optim.Adam(groups, lr=lr, betas=hp.get("betas", (0.9, 0.999)), eps=1e-8)
  if name == "adamw":
    return torch.optim.AdamW(groups, lr=lr, betas=hp.get("betas", (0.9, 0.999)), eps=1e-8)
  return torch.optim.SGD(groups, lr=lr, momentum=hp.get("momentum", 0.0),
                         nesterov=hp.get("nesterov", False))


CASES = [
    ("adam", dict(), 1e-4, True),
    ("adam", dict(betas=(0.8, 0.99)), 5e-2, True),
    ("sgd", dict(momentum=0.9), 1e-2, True),
    ("sgd", dict(momentum=0.9, nesterov=True), 1e-2, True),
    ("sgd", dict(), 1e-2, True),
    ("adamw", dict(), 1e-2, False),
]


@pytest.mark.parametrize("name,hp,wd,use_schedule", CASES)
def test_matches_torch(name, hp, wd, use_schedule):
  params = make_params()
  tr, fr = optim.split(params, RULES)
  resolved = optim.resolve(params, RULES)
  base_lr = 1e-2 if name != "sgd" else 5e-2
  sched = optax.linear_schedule(base_lr, base_lr * 0.1, 6) if use_schedule else base_lr
  tx = optim.make_optimizer(tr, RULES, name=name, learning_rate=sched, weight_decay=wd, **hp)
  state = tx.init(tr)

  @jax.jit
  def step(tr, state, g):
    u, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, u), state

  tparams = {n: torch.tensor(np.array(v), requires_grad=True) for n, v in flat(tr).items()}
  topt = _torch_opt(name, tparams, resolved, base_lr, wd, hp)
  rng = np.random.default_rng(1)
  frozen_before = jax.tree.map(np.array, fr)
  for t in range(6):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tr)
    for g in topt.param_groups:
      lr_t = sched(t) if callable(sched) else sched
      g["lr"] = float(lr_t) * g["mult"]
    for n, p in tparams.items():
      p.grad = torch.tensor(flat(grads)[n])
    topt.step()
    tr, state = step(tr, state, grads)
    for n, v in flat(tr).items():
      np.testing.assert_allclose(np.asarray(v), tparams[n].detach().numpy(), rtol=2e-5,
                                 atol=1e-6, err_msg=f"{name} step {t} {n}")
  jax.tree.map(np.testing.assert_array_equal, fr, frozen_before)


def test_frozen_leaves_have_no_state():
  params = make_params()
  params["txt"]["emb"] = np.zeros((37, 11), np.float32)  # a shape nothing else has
  tr, fr = optim.split(params, RULES)
  tx = optim.make_optimizer(tr, RULES, name="adam", learning_rate=1e-3, weight_decay=1e-4)
  state = tx.init(tr)
  shapes = [np.shape(x) for x in jax.tree.leaves(state)]
  assert (37, 11) not in shapes
  n_train = sum(np.size(x) for x in jax.tree.leaves(tr))
  n_state = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
  assert n_state == 2 * n_train
  # SGD with momentum: exactly one buffer per trainable value.
  tx = optim.make_optimizer(tr, RULES, name="sgd", learning_rate=1e-3, momentum=0.9)
  state = tx.init(tr)
  assert sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0) == n_train


def test_clip_norm_and_rule_table():
  params = make_params()
  tr, _ = optim.split(params, RULES)
  tx = optim.make_optimizer(tr, [(".*", Rule())], name="sgd", learning_rate=1.0, clip_norm=0.5)
  grads = jax.tree.map(lambda x: np.full(x.shape, 3.0, np.float32), tr)
  norm = jax.jit(lambda g, s, p: optax.tree.norm(tx.update(g, s, p)[0]))
  assert np.isclose(float(norm(grads, tx.init(tr), tr)), 0.5, rtol=1e-5)

  table = optim.rule_table(params, RULES, base_lr=1e-3, weight_decay=1e-4)
  lines = {ln.split()[0]: ln for ln in table.splitlines() if ln.strip()}
  assert "FROZEN" in lines["txt/ln/bias"]
  assert "0.002" in lines["head/bias"]
  assert "trainable" in table and "frozen 18" in table
  assert "(4, 6)" in lines["img/blocks_0/attn/qkv/kernel"]
  extra = optim.rule_table(params, RULES + [("never/.*", FREEZE)])
  assert "matches nothing" in extra
