"""Zero-shot CLIP (templates, ensemble) against open_clip's encode_text, the linear probe's C
search, and every CoOp paper config."""
from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest

from jaxprompt.coop import zeroshot
from jaxprompt import tokenizer
from jaxprompt.convert.openai_clip import load_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_templates():
  assert zeroshot.templates_for("dtd") == ["{} texture."]
  ens = zeroshot.templates_for("imagenet", ensemble=True)
  assert len(ens) == 7 and "itap of a {}." in ens
  pets = zeroshot.templates_for("oxford_pets", ensemble=True)
  assert len(pets) == 8 and pets[-1] == "a photo of a {}, a type of pet."


def test_zeroshot_classifier_matches_open_clip():
  torch = pytest.importorskip("torch")
  open_clip_model = pytest.importorskip("open_clip.model")
  from torch_fixtures import close, randomise  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  clip = randomise(open_clip_model.CLIP(
      32, dict(layers=1, width=64, patch_size=16, image_size=32),
      dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True), 0)
  model, variables = load_clip({k: v.numpy() for k, v in clip.state_dict().items()})
  names = ["tench", "great_white_shark", "Sea or Lake"]
  templates = zeroshot.templates_for("eurosat", ensemble=True)
  got = zeroshot.classifier(model, variables, names, templates, batch=2)
  with torch.no_grad():
    acc = 0
    for t in templates:
      ids = torch.from_numpy(tokenizer.tokenize([t.format(n.replace("_", " ")) for n in names])
                             .astype(np.int64))
      acc = acc + clip.encode_text(ids, normalize=True)
    ref = acc / len(templates)
    ref = ref / ref.norm(dim=-1, keepdim=True)
  close(got, ref, 1e-5)


def test_linear_probe_search():
  rs = np.random.RandomState(0)
  centers = rs.randn(3, 8) * 3
  def make(n):
    y = np.repeat(np.arange(3), n)
    return (centers[y] + rs.randn(len(y), 8)).astype(np.float32), y
  res = zeroshot.linear_probe(make(4), make(4), make(50), max_iter=200, search_steps=3)
  assert res["acc"] > 90 and res["C"] > 0
  with pytest.raises(ValueError, match="val set is empty"):
    zeroshot.linear_probe(make(4), (np.zeros((0, 8)), np.zeros(0)), make(2))


def test_linear_probe_search_hand_worked(monkeypatch):
  """The C search of KaiyangZhou/CoOp lpclip/linear_probe.py on a classifier whose val
  accuracy falls with |log10 C - log10 3|: the grid peaks at C=1, then the bisection visits
  (0.1, 10) -> 10, (1, 10) -> 1, (1, sqrt 10) -> sqrt 10; each fit is on the train split
  only, with lbfgs and max_iter."""
  import sklearn.linear_model  # pylint: disable=import-outside-toplevel
  fits = []

  class Fake:
    def __init__(self, solver, max_iter, C):  # noqa: N803 (sklearn's name)
      assert solver == "lbfgs" and max_iter == 77
      self.c = C

    def fit(self, x, y):
      fits.append((self.c, len(x)))
      return self

    def predict(self, x):  # right on the first k of 100 rows, k falling with the distance
      k = int(round(100 - 20 * abs(np.log10(self.c) - np.log10(3.0))))
      return np.where(np.arange(len(x)) < k, 0, 1)

  monkeypatch.setattr(sklearn.linear_model, "LogisticRegression", Fake)
  train_split = (np.zeros((5, 2)), np.zeros(5))
  val = test = (np.zeros((100, 2)), np.zeros(100))
  res = zeroshot.linear_probe(train_split, val, test, max_iter=77, search_steps=3)
  visited = [c for c, _ in fits]
  np.testing.assert_allclose(visited[:7], [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6])
  np.testing.assert_allclose(visited[7:], [0.1, 10, 1, 10, 1, 10 ** 0.5], rtol=1e-12)
  assert all(n == 5 for _, n in fits)
  assert res["C"] == pytest.approx(10 ** 0.5, rel=1e-12)
  assert res["acc"] == pytest.approx(100 - 20 * abs(0.5 - np.log10(3.0)), abs=1.0)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "coop", "*.py"))))
def test_paper_configs(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.pipeline == "coop"
  assert "python launch.py --config configs/coop/" + os.path.basename(path) in mod.__doc__
  assert "Paper" in mod.__doc__
  if c.method == "cocoop":
    assert c.data.batch_size == 1 and c.train.total_epochs == 10 and c.prompt.n_ctx == 4
  if c.method in ("coop", "cocoop"):
    assert c.train.optimizer.name == "sgd" and c.train.optimizer.weight_decay == 5e-4
    assert c.train.optimizer.hparams.momentum == 0.9 and c.train.warmup_lr == 1e-5


def test_robustness_rows_match_their_docstring_table():
  import runpy  # pylint: disable=import-outside-toplevel
  path = os.path.join(ROOT, "configs", "coop", "dg_coop_robustness.py")
  mod = runpy.run_path(path)
  table = mod["__doc__"].split("Paper")[1].splitlines()[2:7]
  for line in table:
    backbone, m, *accs = line.split()
    c = mod["get_config"](f"{backbone},{m}")
    assert (c.backbone, c.prompt.n_ctx, c.protocol) == (backbone, int(m), "transfer")
    assert c.prompt.ctx_init == ("a photo of a" if m == "4" else "")
    assert c.train.total_epochs == 50 and c.data.shots == 16 and c.data.name == "imagenet"
    assert c.paper.to_dict() == dict(zip(["imagenet", *c.eval.targets], map(float, accs)))
  with pytest.raises(ValueError, match="backbone must be one of"):
    mod["get_config"]("RN18,16")
