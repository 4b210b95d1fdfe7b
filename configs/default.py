"""Placeholder default: the two-stage toy run on synthetic data (to be replaced by a recipe).

  python launch.py --workdir=/tmp/jaxprompt_default
  python launch.py --workdir=/tmp/jaxprompt_default --config.fsdp=2 --config.precision=bfloat16

Trains `tests/toy_pipeline.py` (a tiny tower + prompt + head) for a few epochs per
stage, in seconds on CPU; it exercises the trainer, checkpoints and launcher end
to end. The config itself lives in `tests/toy_pipeline.py::get_config`.
"""
from tests.toy_pipeline import get_config  # noqa: F401
