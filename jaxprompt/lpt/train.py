"""LPT (ICLR 2023) driver: phase 1 (shared prompts), phase 2 (group prompts), eval.

  python launch.py --config configs/<lpt row>.py --workdir RUN            # all stages
  python launch.py --config ... --workdir RUN --stage phase2               # one stage
  python launch.py --config ... --workdir RUN --stage eval \\
      --config.eval.predict_dir=/path/to/images                            # + predictions
  python launch.py --config ... --workdir RUN --stage eval \\
      --config.model.released_checkpoint=LPT_places.pth                    # authors' model

Stages (each resumes from its own checkpoints):

1. phase1: shared deep prompts (L, T, D) in every block + cosine head, on the frozen
   tower; A-GCL on a class-aware and an instance-balanced batch per step
   (L = L_CB + w_e L_IB), SGD 0.9, coupled wd 0.01, lr 0.02 @ 256, per-epoch cosine
   with one warm-up epoch at 1e-6.
2. phase2: group prompts (P, G, T, D) + keys (P, D) + head (initialised from phase
   1); shared prompts and tower frozen. The query is the frozen phase-1 class
   token; top-2 keys by cosine, mean of their group prompts beside the shared
   prompt in the last G blocks; L = [A-GCL_CB - 0.5 rs_CB] + w_e [A-GCL_IB - 0.5 rs_IB].
3. eval: overall / many / medium / few accuracy of each stage in `eval.stages`,
   per-class and bucket plots, `eval/<stage>/results.json`; class ids for the
   images of `eval.predict_dir`. With `model.released_checkpoint` (the authors'
   LPT_places.pth, a phase-2 model) only this stage runs, on that file: its results
   go to `eval/phase2/` (the tower, prompts and head all come from the file).

`paper_config(dataset, method)` builds the reference recipe (see `jaxprompt.lpt.config`).
"""
from __future__ import annotations

import re
from typing import Optional

import jax

from jaxprompt.lpt import model as lpt_model
from jaxprompt import optim
from jaxprompt import sharding as shd
from jaxprompt.lpt import config as config_lib
from jaxprompt.lpt import context
from jaxprompt.lpt import evaluate
from jaxprompt.lpt.config import base_config, paper_config, validate_config  # noqa: F401 (re-export)

STAGES = ("phase1", "phase2", "eval")


def run_stages(config) -> tuple[str, ...]:
  """What `--stage` may name (launch.py checks it before any work)."""
  del config
  return STAGES


# The defaults of `phase1.rules` / `phase2.rules` (the config's fields are what runs).
PHASE1_RULES = optim.rules_from_config(config_lib.PHASE1_RULES)
PHASE2_RULES = optim.rules_from_config(config_lib.PHASE2_RULES)


def get_config(arg: Optional[str] = None):
  """`launch.py --config jaxprompt/lpt/train.py:places_lt` (or 'cifar100_lt:100', ...)."""
  return paper_config(arg or "places_lt", "lpt")


# Phase 1 is the plain prompted classifier (shared prompts + head), as VPT's.
phase1_forward = context.classifier_forward


def phase2_forward(setup: context.Context):
  spec = setup.spec

  def forward(params, images, rng):
    # Fused: blocks before the group layers run once for the query and the main pass
    # (exact: the tower has no dropout and the shared prompt is frozen).
    return lpt_model.phase2_forward(setup.vit, params, images, spec, rng=rng, fused=True)
  return forward


def carried_leaves(params, earlier_rules, rules) -> list[str]:
  """Regexes naming the leaves an earlier stage trains and this stage freezes."""
  trained_before = optim.split(params, earlier_rules)[0]
  return [re.escape(n) for n in shd.leaf_names(optim.split(trained_before, rules)[1])]


def run(config, workdir: str, stage: Optional[str] = None) -> dict:
  """phase1 -> phase2 -> eval; `stage` runs (or resumes) only that one."""
  if stage is not None and stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; this pipeline has {STAGES}")
  if config.method != "lpt":
    raise ValueError(f"pipeline 'lpt' runs method 'lpt', not {config.method!r} (use 'vpt')")
  released = config.model.released_checkpoint
  if released and stage != "eval":
    raise ValueError(
        f"model.released_checkpoint is set ({released}): it can only be evaluated; run with "
        "--stage eval, or unset it to train" + ("" if stage is None else f" (got --stage {stage})"))
  setup = context.open_run(config, workdir)
  results = {}

  # Phase 1: shared prompts + head; everything else frozen (group prompts and keys
  # exist in the tree but are unused and frozen here).
  if stage in (None, "phase1"):
    results["phase1"] = context.train_stage(
        setup, workdir, "phase1", forward=phase1_forward(setup),
        rules=optim.rules_from_config(config.phase1.rules, "phase1.rules"),
        init=lambda rng: (setup.init_params(), {}),
        on_epoch_end=evaluate.select_hook(setup, workdir, "phase1", phase=1))

  # Phase 2: group prompts, keys and head (from phase 1); shared prompts and tower frozen.
  if stage in (None, "phase2"):
    def init2(rng):
      del rng
      return context.params_after(workdir, ["phase1"], setup.init_params()), {}

    rules2 = optim.rules_from_config(config.phase2.rules, "phase2.rules")
    # Phase 1's leaves that phase 2 keeps frozen (the shared prompts) are saved with phase
    # 2's checkpoints: a resumed phase 2 starts from the untrained tree and reads no phase 1.
    carry = carried_leaves(setup.init_params(),
                           optim.rules_from_config(config.phase1.rules, "phase1.rules"), rules2)
    results["phase2"] = context.train_stage(
        setup, workdir, "phase2", forward=phase2_forward(setup), init=init2, rules=rules2,
        seed_offset=1, frozen_source=f"{setup.vit_source} + {workdir}/phase1",
        resume_init=lambda rng: (setup.init_params(), {}), carry=carry,
        on_epoch_end=evaluate.select_hook(setup, workdir, "phase2", phase=2))

  # Eval: each requested finished stage, on the test split.
  if released:
    results["eval"] = {"phase2": evaluate.eval_released(setup, workdir)}
  elif stage in (None, "eval"):
    results["eval"] = {}
    stages = list(config.eval.stages)
    for i, name in enumerate(stages):
      chain = ["phase1"] if name == "phase1" else ["phase1", "phase2"]
      results["eval"][name] = evaluate.eval_stage(
          setup, workdir, chain, phase=1 if name == "phase1" else 2,
          predict_images=i == len(stages) - 1)
  jax.effects_barrier()
  return results
