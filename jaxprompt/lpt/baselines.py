"""VPT-deep, VPT-shallow and linear-probe baselines on the frozen tower: train, eval.

  python launch.py --config configs/<vpt row>.py --workdir RUN               # train + eval
  python launch.py --config ... --workdir RUN --stage eval --config.eval.predict_dir=DIR

Stages:

1. train: prompts (`prompt/deep` (L, T, D) or `prompt/shallow` (T, D); none for
   the linear probe) + head on the frozen tower (VPT: trainable = prompts + head).
   Loss, sampling, head and schedule come from the config (`paper_config`
   defaults: VPT's own recipe, linear head + CE, instance-balanced batches).
2. eval: shot accuracies, plots and `eval/train/results.json`; predictions for
   `eval.predict_dir`.
"""
from __future__ import annotations

from typing import Optional

import jax

from jaxprompt import optim
from jaxprompt.lpt import config as config_lib
from jaxprompt.lpt import context
from jaxprompt.lpt import evaluate
from jaxprompt.lpt.config import base_config, paper_config, validate_config  # noqa: F401 (re-export)

STAGES = ("train", "eval")


def run_stages(config) -> tuple[str, ...]:
  """What `--stage` may name (launch.py checks it before any work)."""
  del config
  return STAGES


METHODS = ("vpt_deep", "vpt_shallow", "linear")

# The default of `train.rules` (the config's field is what runs).
TRAIN_RULES = optim.rules_from_config(config_lib.BASELINE_RULES)


def get_config(arg: Optional[str] = None):
  """`launch.py --config jaxprompt/lpt/baselines.py:places_lt,vpt_deep`."""
  dataset, _, method = (arg or "places_lt,vpt_deep").partition(",")
  return paper_config(dataset, method or "vpt_deep")


def run(config, workdir: str, stage: Optional[str] = None) -> dict:
  """train -> eval; `stage` runs (or resumes) only that one."""
  if stage is not None and stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; this pipeline has {STAGES}")
  if config.method not in METHODS:
    raise ValueError(f"pipeline 'vpt' runs {METHODS}, not {config.method!r} (LPT: 'lpt')")
  setup = context.open_run(config, workdir)
  results = {}

  # Train: prompts (if any) and head; the tower frozen.
  if stage in (None, "train"):
    results["train"] = context.train_stage(
        setup, workdir, "train", forward=context.classifier_forward(setup),
        rules=optim.rules_from_config(config.train.rules, "train.rules"),
        init=lambda rng: (setup.init_params(), {}),
        on_epoch_end=evaluate.select_hook(setup, workdir, "train", phase=1))

  # Eval on the test split.
  if stage in (None, "eval"):
    results["eval"] = {"train": evaluate.eval_stage(setup, workdir, ["train"], phase=1)}
  jax.effects_barrier()
  return results
