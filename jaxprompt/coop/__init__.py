"""CoOp and CoCoOp: learned (and image-conditioned) text context for CLIP classification.

  config.py    the recipe (`base_config`, `coop_rn50_fewshot`, `base2new`)
  train.py     the driver: `run(config, workdir, stage=None)`, stages train -> eval -> table
  model.py     prompt learners, prompt assembly, chunked/rematerialised text encoding
  data.py      dataset readers, few-shot sampling, base/new split, transforms
  evaluate.py  top-1, seed aggregation, base/new/H, tables (`python -m jaxprompt.coop.evaluate`)
  zeroshot.py  zero-shot CLIP and the linear-probe baseline
  released.py  the authors' released prompt learners
  paper.py     the published numbers
  demo.py      a CPU-sized demonstration on generated shapes
"""
