"""The baselines of the CoOp/CoCoOp tables: zero-shot CLIP (one hand-written template per
dataset, or the ImageNet prompt ensemble; KaiyangZhou/CoOp trainers/zsclip.py) and the
linear-probe CLIP (KaiyangZhou/CoOp lpclip/: L2 logistic regression on raw frozen image
features, C chosen on the few-shot val set by a coarse grid then a log-space bisection)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.coop import data as data_lib
from jaxprompt.coop import evaluate
from jaxprompt.coop import model as M
from jaxprompt import metrics as metrics_lib
from jaxprompt import tokenizer

# The 7-template subset of OpenAI's ImageNet notebook used by ZeroshotCLIP2.
IMAGENET_ENSEMBLE = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}.")


def templates_for(dataset: str, ensemble: bool = False) -> list[str]:
  """The dataset's template; with `ensemble`, the 7 ImageNet templates (+ the dataset's own
  for every dataset but ImageNet)."""
  own = data_lib.template(dataset)
  if not ensemble:
    return [own]
  return list(IMAGENET_ENSEMBLE) + ([] if dataset.lower() == "imagenet" else [own])


def classifier(clip_model, variables: Mapping[str, Any], classnames: Sequence[str],
               templates: Sequence[str], batch: int = 256) -> jax.Array:
  """(C, E) L2-normalised text classifier, averaged over templates and re-normalised."""
  enc = jax.jit(lambda v, ids: M.l2n(clip_model.apply(v, ids, method="encode_text")))
  names = [M.clean_name(n) for n in classnames]
  acc = 0.0
  for t in templates:
    ids = tokenizer.tokenize([t.format(n) for n in names])
    rows = [enc(variables, jnp.asarray(ids[i:i + batch])) for i in range(0, len(ids), batch)]
    acc = acc + jnp.concatenate(rows)
  return M.l2n(acc / len(templates))


def zeroshot_scorer(clip_model, variables, classnames, templates):
  g = classifier(clip_model, variables, classnames, templates)
  scale = jnp.exp(variables["params"]["txt"]["logit_scale"])
  fn = jax.jit(lambda v, x: scale * M.l2n(M.image_features(clip_model, v, x)) @ g.T)
  return lambda x: fn(variables, x)


def features(clip_model, variables, items, *, batch_size=100, image_size=224,
             desc: str = "") -> tuple:
  """Raw (unnormalised) image features with the test transform, and labels."""
  fn = jax.jit(lambda v, x: M.image_features(clip_model, v, x))
  loader = evaluate.predict_loader(items, batch_size, image_size)
  feats, labels = [], []
  for b in metrics_lib.progress(loader.iterate(0), total=loader.steps_per_epoch(0),
                                desc=desc or f"image features of {len(items)} images"):
    feats.append(np.asarray(fn(variables, jnp.asarray(b["image"]))))
    labels.append(b["label"])
  return np.concatenate(feats)[:len(items)], np.concatenate(labels)[:len(items)]


def linear_probe(train: tuple, val: tuple, test: tuple, *, max_iter: int = 1000,
                 search_steps: int = 8) -> dict:
  """Test accuracy (percent) and the chosen C, with the reference's C search."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel

  def fit(c):
    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c)
    clf.fit(*train)
    return clf, float(np.mean(clf.predict(val[0]) == val[1]))

  if len(val[0]) == 0:
    raise ValueError("linear probe: the few-shot val set is empty (needed to choose C)")
  grid = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
  accs = [fit(c)[1] for c in grid]
  peak = grid[int(np.argmax(accs))]
  left, right = 0.1 * peak, 10.0 * peak
  best_c, best = peak, None
  for _ in range(search_steps):
    clf_l, acc_l = fit(left)
    clf_r, acc_r = fit(right)
    if acc_l < acc_r:
      best_c, best = right, clf_r
      left, right = 0.5 * (np.log10(right) + np.log10(left)), np.log10(right)
    else:
      best_c, best = left, clf_l
      right, left = 0.5 * (np.log10(right) + np.log10(left)), np.log10(left)
    left, right = float(10 ** left), float(10 ** right)
  if best is None:
    best, _ = fit(peak)
  acc = 100.0 * float(np.mean(best.predict(test[0]) == test[1]))
  return dict(acc=acc, C=float(best_c))
