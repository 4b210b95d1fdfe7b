"""Config values are checked before any work: one line naming the field, exit code 1, no
traceback, and the workdir's config.json (the record of an earlier run) left as it was.

Runs the real launcher in subprocesses on each family's tiny config (and the CoOp and
default-job configs), plus in-process checks of `jaxprompt.validate`.
"""
from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from jaxprompt import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_configs.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")

CASES = [
    # (config spec, override, text the one error line must hold)
    ("clipreid", "--config.data.size=64", "data.size must be (H, W), two positive integers"),
    ("clipreid", "--config.stage2.batch_size=0", "stage2.batch_size must be positive, got 0"),
    ("clipreid", "--config.model.weights=/nonexistent/ViT-B-16.pt",
     "model.weights: file not found: /nonexistent/ViT-B-16.pt"),
    ("clipreid", "--config.data.name=market2000", "data.name must be one of"),
    ("lpt", "--config.phase1.total_epochs=-1", "phase1.total_epochs must be >= 0, got -1"),
    ("lpt", "--config.data.sampling=balanced", "data.sampling must be one of"),
    ("vpt", "--config.model.weights=/nonexistent/vit.npz",
     "model.weights: file not found: /nonexistent/vit.npz"),
    ("coop", "--config.data.shots=-2", "data.shots must be >= 0, got -2"),
    ("coop", "--config.model.weights=/nonexistent/RN50.pt",
     "model.weights: file not found: /nonexistent/RN50.pt"),
    ("default", "--config.clipreid.data.size=64", "clipreid.data.size must be (H, W)"),
    ("lpt", "--stage=phase3", "--stage=phase3: unknown stage; the lpt pipeline has"),
    ("clipreid", "--config.variant=sie", "variant must be one of"),
]


def _spec(family: str, root: str) -> str:
  if family == "coop":
    return os.path.join(ROOT, "configs", "coop", "fewshot_rn50_end.py")
  if family == "default":
    return os.path.join(ROOT, "configs", "default.py")
  return f"{TINY}:{family},{root}" if family == "clipreid" else f"{TINY}:{family}"


@pytest.mark.parametrize("family,override,expected", CASES,
                         ids=[f"{c[0]}:{c[1].split('=')[0].lstrip('-')}" for c in CASES])
def test_bad_value_is_one_line_naming_the_field(family, override, expected, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  record = '{"the config": "of an earlier run"}'
  (workdir / "config.json").write_text(record)
  p = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                      f"--config={_spec(family, str(tmp_path))}", override,
                      f"--workdir={workdir}"],
                     cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
  assert p.returncode == 1, p.stderr[-2000:]
  assert len(errors) == 1, p.stderr[-2000:]
  assert expected in errors[0], errors[0]
  assert "Traceback" not in p.stderr
  assert (workdir / "config.json").read_text() == record
  assert not (workdir / "log.txt").exists()  # nothing was started


def _cfg(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def test_helpers_name_the_field_and_accept_good_values(tmp_path):
  c = _cfg(data=_cfg(size=(256, 128), root=str(tmp_path), n=3, lr=0.1, name="a"),
           s=_cfg(total_epochs=0, total_steps=0))
  assert validate.size_hw(c, "data.size") == (256, 128)
  assert validate.positive(c, "data.n") == 3
  assert validate.existing_path(c, "data.root", kind="dir") == str(tmp_path)
  for bad in [(64,), (0, 5), (1.5, 2), "64x32", (1, 2, 3)]:  # plain dicts take any type
    with pytest.raises(validate.ConfigError, match=r"^data\.size must be \(H, W\)"):
      validate.size_hw({"data": {"size": bad}}, "data.size")
  with pytest.raises(validate.ConfigError, match="^data.n must be one of"):
    validate.one_of(c, "data.n", (1, 2))
  with pytest.raises(validate.ConfigError, match="^data.lr must be an integer, got 0.1"):
    validate.positive(c, "data.lr")
  with pytest.raises(validate.ConfigError, match="no field 'data.missing'"):
    validate.value(c, "data.missing")
  with pytest.raises(FileNotFoundError, match="^data.name: file not found: a$"):
    validate.existing_path(c, "data.name", kind="file")
  with pytest.raises(validate.ConfigError, match=r"^s\.total_epochs or \.total_steps"):
    validate.stage_fields(c, "s")
  # A sub-config names its fields in full.
  with pytest.raises(validate.ConfigError, match=r"^job\.data\.n must be one of"):
    validate.one_of(validate.Scoped(c, "job"), "data.n", (1, 2))


def test_every_config_file_passes_its_validator_once_paths_are_set(tmp_path):
  """The shipped configs are valid, but for the weight paths a user must supply."""
  import glob
  import importlib.util
  from jaxprompt import methods
  weights = tmp_path / "w.pt"
  weights.write_bytes(b"")
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    if c.pipeline == "clipreid":
      c.model.weights = str(weights)
    elif c.pipeline == "coop":
      c.model.weights = str(weights)
    methods.get(c.pipeline).validate_config(c)
