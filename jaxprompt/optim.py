"""Stage rules -> one optax transformation over the trainable part of the params.

A stage is an ordered list of `(regex, Rule)`; each '/'-joined param name takes the first rule
whose regex fullmatches it, and every name must be covered. `split` cuts the params into the
trainable and frozen trees; `make_optimizer` builds an optax transformation for the trainable
tree only, so frozen leaves carry no optimizer state and receive no gradients.

Optimizers follow torch semantics, because the reference recipes are torch code:
  * 'adam'  = torch.optim.Adam, 'sgd' = torch.optim.SGD (momentum, optional nesterov),
    'adamw' = torch.optim.AdamW.
  * coupled_decay=True (torch Adam/SGD `weight_decay`): wd * wd_mult * param is added to the
    gradient before the moments / momentum. 'adamw' always decays decoupled.
  * The update of a leaf is -lr(t) * lr_mult * (...), lr_mult and wd_mult from its rule.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence, Union

import jax
import numpy as np
import optax

from jaxprompt.convert.io import flatten


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one parameter trains: whether at all, and its lr / weight-decay multipliers."""
  train: bool = True
  lr_mult: float = 1.0
  wd_mult: float = 1.0


FREEZE = Rule(train=False)

Rules = Sequence[tuple[str, Rule]]
ScalarOrSchedule = Union[float, Callable[[Any], Any]]

_SEP = "/"


def rules_from_config(entries: Sequence[Any], where: str = "rules") -> list[tuple[str, Rule]]:
  """A stage's `rules` config field -> [(regex, Rule)].

  Each entry is `(regex, rule)` with rule one of 'freeze', 'train', a mapping of Rule fields
  (e.g. {'lr_mult': 2.0, 'wd_mult': 0.0}; train defaults to True) or a Rule. The form is
  plain literals so `--config.stage2.rules='[("txt/.*", "freeze"), (".*", "train")]'`
  overrides it from the command line.
  """
  out, problems = [], []
  fields = {f.name for f in dataclasses.fields(Rule)}
  for i, entry in enumerate(entries or ()):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      problems.append(f"  {where}[{i}]: expected (regex, rule), got {entry!r}")
      continue
    pattern, spec = entry
    if isinstance(spec, Rule):
      rule = spec
    elif spec == "freeze":
      rule = FREEZE
    elif spec == "train":
      rule = Rule()
    elif isinstance(spec, Mapping) and set(spec) <= fields:
      rule = Rule(**{k: (bool(v) if k == "train" else float(v)) for k, v in spec.items()})
    else:
      problems.append(f"  {where}[{i}] ({pattern!r}): rule must be 'freeze', 'train' or a "
                      f"mapping of {sorted(fields)}, got {spec!r}")
      continue
    out.append((pattern, rule))
  if problems:
    raise ValueError("Invalid stage rules:\n" + "\n".join(problems))
  if not out:
    raise ValueError(f"{where} is empty: a stage needs at least one (regex, rule)")
  return out


# ----------------------------------------------------------------------------- names


def _items(tree: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
  # The one walker of nested dicts (`convert.io.flatten`): same names, insertion order.
  return flatten(tree).items()


def param_names(tree: Mapping[str, Any]) -> list[str]:
  """'/'-joined paths of every leaf of a nested dict, in traversal order."""
  return [n for n, _ in _items(tree)]


def _check_rules(rules: Rules) -> list[tuple[str, re.Pattern, Rule]]:
  compiled, problems = [], []
  for i, entry in enumerate(rules):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      problems.append(f"  rule {i}: expected (regex, Rule), got {entry!r}")
      continue
    pattern, rule = entry
    if not isinstance(rule, Rule):
      problems.append(f"  rule {i} ({pattern!r}): expected a Rule, got {rule!r}")
      continue
    if not isinstance(pattern, str):
      problems.append(f"  rule {i}: pattern must be a str, got {pattern!r}")
      continue
    if pattern.startswith(_SEP):
      problems.append(f"  rule {i} ({pattern!r}): names have no leading '/'")
    if rule.train and (rule.lr_mult < 0 or rule.wd_mult < 0):
      problems.append(f"  rule {i} ({pattern!r}): multipliers must be >= 0, got {rule}")
    try:
      compiled.append((pattern, re.compile(pattern), rule))
    except re.error as e:
      problems.append(f"  rule {i}: bad regex {pattern!r}: {e}")
  if problems:
    raise ValueError("Invalid stage rules:\n" + "\n".join(problems))
  return compiled


def _resolve_indexed(params: Mapping[str, Any], rules: Rules) -> dict[str, tuple[int, Rule]]:
  compiled = _check_rules(rules)
  out, uncovered = {}, []
  for name in param_names(params):
    for i, (_, rx, rule) in enumerate(compiled):
      if rx.fullmatch(name):
        out[name] = (i, rule)
        break
    else:
      uncovered.append(name)
  if uncovered:
    raise ValueError(
        f"{len(uncovered)} parameter(s) not covered by any rule (add a rule, e.g. "
        f"('.*', FREEZE), to cover them):\n" + "\n".join(f"  {n}" for n in uncovered))
  return out


def resolve(params: Mapping[str, Any], rules: Rules) -> dict[str, Rule]:
  """Maps every param name to its rule (first fullmatch wins); raises listing uncovered names."""
  return {n: r for n, (_, r) in _resolve_indexed(params, rules).items()}


# ----------------------------------------------------------------------------- split/merge


def _build(pairs: Iterable[tuple[str, Any]]) -> dict:
  root: dict = {}
  for name, v in pairs:
    *parents, leaf = name.split(_SEP)
    node = root
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return root


def _select(tree: Mapping[str, Any], keep: Callable[[str], bool], prefix: str = "") -> dict:
  # Walks the original mapping (not split names) so keys containing '/' survive unchanged.
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{_SEP}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      sub = _select(v, keep, name)
      if sub:
        out[k] = sub
    elif keep(name):
      out[k] = v
  return out


def split(params: Mapping[str, Any], rules: Rules) -> tuple[dict, dict]:
  """(trainable, frozen): the params cut by the rules, each pruned and keeping the nesting."""
  resolved = resolve(params, rules)
  trainable = _select(params, lambda n: resolved[n].train)
  frozen = _select(params, lambda n: not resolved[n].train)
  return trainable, frozen


def _merge_into(out: dict, tree: Mapping[str, Any], prefix: str) -> None:
  for k, v in tree.items():
    name = f"{prefix}{_SEP}{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      node = out.setdefault(k, {})
      if not isinstance(node, dict):
        raise ValueError(f"merge: {name!r} is a leaf in one tree and a subtree in the other")
      _merge_into(node, v, name)
    elif k in out:
      raise ValueError(f"merge: {name!r} is present in both trees")
    else:
      out[k] = v


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `split`: one nested dict holding the leaves of both trees."""
  out: dict = {}
  _merge_into(out, trainable, "")
  _merge_into(out, frozen, "")
  return out


def _like(tree: Mapping[str, Any], fn: Callable[[str, Any], Any], prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{_SEP}{k}" if prefix else str(k)
    out[k] = _like(v, fn, name) if isinstance(v, Mapping) else fn(name, v)
  return out


# ----------------------------------------------------------------------------- optax pieces


def _per_leaf_decay(weights: Any) -> optax.GradientTransformation:
  """updates + w_leaf * params, with a static per-leaf weight tree (zeros skipped)."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs params: call tx.update(grads, state, params)")
    updates = jax.tree.map(lambda u, p, w: u if w == 0.0 else u + w * p,
                           updates, params, weights)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def _per_leaf_scale(mults: Any) -> optax.GradientTransformation:
  """updates * m_leaf with a static per-leaf multiplier tree."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u if m == 1.0 else u * m, updates, mults), state

  return optax.GradientTransformation(init_fn, update_fn)


class _Hparams(NamedTuple):
  b1: float
  b2: float
  eps: float
  momentum: float
  nesterov: bool
  clip_norm: float | None


def _parse_hparams(name: str, hparams: dict) -> _Hparams:
  h = dict(hparams)
  betas = h.pop("betas", None)
  b1, b2 = betas if betas is not None else (0.9, 0.999)
  b1 = h.pop("b1", b1)
  b2 = h.pop("b2", b2)
  eps = h.pop("eps", 1e-8)
  momentum = h.pop("momentum", 0.0)
  nesterov = h.pop("nesterov", False)
  dampening = h.pop("dampening", 0.0)
  clip_norm = h.pop("clip_norm", None)
  if h:
    raise TypeError(f"make_optimizer({name!r}): unknown hparams {sorted(h)}")
  if name == "sgd":
    if dampening != 0.0:
      raise NotImplementedError("SGD dampening != 0 is not supported")
    if nesterov and momentum <= 0.0:
      raise ValueError("nesterov SGD needs momentum > 0 (as in torch)")
  elif momentum or nesterov:
    raise TypeError(f"momentum/nesterov are SGD hparams, not {name!r}")
  return _Hparams(b1, b2, eps, momentum, nesterov, clip_norm)


def make_optimizer(trainable: Mapping[str, Any], rules: Rules, *, name: str,
                   learning_rate: ScalarOrSchedule, weight_decay: float = 0.0,
                   coupled_decay: bool = True, **hparams: Any) -> optax.GradientTransformation:
  """One optax transformation for the trainable tree, with per-leaf lr / wd multipliers.

  Hparams: adam/adamw `betas` (or `b1`, `b2`), `eps`; sgd `momentum`, `nesterov`;
  any: `clip_norm` (global-norm clipping of the raw gradients, as torch's clip_grad_norm_).
  `learning_rate` is a float or an optax schedule of the update count (0 for the first step).
  """
  name = name.lower()
  if name not in ("adam", "adamw", "sgd"):
    raise ValueError(f"unknown optimizer {name!r}; expected 'adam', 'adamw' or 'sgd'")
  h = _parse_hparams(name, hparams)
  resolved = resolve(trainable, rules)
  frozen_here = [n for n, r in resolved.items() if not r.train]
  if frozen_here:
    raise ValueError("make_optimizer takes the trainable tree only (use split first); frozen "
                     "by the rules:\n" + "\n".join(f"  {n}" for n in frozen_here))

  if not resolved:
    raise ValueError("make_optimizer: the trainable tree is empty (every parameter is frozen)")

  wd = _like(trainable, lambda n, _: float(weight_decay) * resolved[n].wd_mult)
  lr_mult = _like(trainable, lambda n, _: float(resolved[n].lr_mult))
  any_decay = any(w != 0.0 for w in jax.tree.leaves(wd))
  decoupled = name == "adamw" or not coupled_decay

  chain = []
  if h.clip_norm is not None:
    chain.append(optax.clip_by_global_norm(h.clip_norm))
  if any_decay and not decoupled:
    chain.append(_per_leaf_decay(wd))
  if name in ("adam", "adamw"):
    chain.append(optax.scale_by_adam(b1=h.b1, b2=h.b2, eps=h.eps, eps_root=0.0))
  elif h.momentum > 0.0:
    # optax.trace starts from zero, so its first step equals torch's buf = grad.
    chain.append(optax.trace(decay=h.momentum, nesterov=h.nesterov))
  if any_decay and decoupled:
    # torch AdamW: p -= lr * wd * p, with the group's lr (so lr_mult scales it too).
    chain.append(_per_leaf_decay(wd))
  if any(m != 1.0 for m in jax.tree.leaves(lr_mult)):
    chain.append(_per_leaf_scale(lr_mult))
  chain.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*chain)


# ----------------------------------------------------------------------------- reporting


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def rule_table(params: Mapping[str, Any], rules: Rules, *, base_lr: float | None = None,
               weight_decay: float | None = None) -> str:
  """Human-readable per-parameter resolution of the rules, with counts per rule and overall."""
  resolved = _resolve_indexed(params, rules)
  leaves = dict(_items(params))
  header = ["param", "shape", "size", "rule", "train", "lr_mult", "wd_mult"]
  if base_lr is not None:
    header.append("lr")
  if weight_decay is not None:
    header.append("wd")
  rows = []
  per_rule = [[0, 0] for _ in rules]
  n_train = n_frozen = 0
  for name, (i, rule) in resolved.items():
    shape = _shape(leaves[name])
    size = int(np.prod(shape)) if shape else 1
    per_rule[i][0] += 1
    per_rule[i][1] += size
    if rule.train:
      n_train += size
    else:
      n_frozen += size
    row = [name, str(shape), str(size), str(i), "yes" if rule.train else "FROZEN",
           f"{rule.lr_mult:g}" if rule.train else "-", f"{rule.wd_mult:g}" if rule.train else "-"]
    if base_lr is not None:
      row.append(f"{base_lr * rule.lr_mult:.3g}" if rule.train else "-")
    if weight_decay is not None:
      row.append(f"{weight_decay * rule.wd_mult:.3g}" if rule.train else "-")
    rows.append(row)
  widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]

  def fmt(r):
    return "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()

  lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  lines.append("")
  lines.append("rules:")
  for i, (pattern, rule) in enumerate(rules):
    what = ("FREEZE" if not rule.train
            else f"train lr_mult={rule.lr_mult:g} wd_mult={rule.wd_mult:g}")
    unused = "  (matches nothing)" if per_rule[i][0] == 0 else ""
    lines.append(f"  [{i}] {pattern!r}: {what}: {per_rule[i][0]} arrays, "
                 f"{per_rule[i][1]:,} values{unused}")
  total = n_train + n_frozen
  frac = 100.0 * n_train / total if total else 0.0
  lines.append(f"trainable {n_train:,} / {total:,} values ({frac:.3f}%), frozen {n_frozen:,}")
  return "\n".join(lines)
