"""Zero-shot CLIP (templates, ensemble) against open_clip's encode_text, the linear probe's C
search, and every CoOp paper config."""
from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest

from jaxprompt.coop import zeroshot
from jaxprompt.coop.shared import load_clip, tokenizer

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
