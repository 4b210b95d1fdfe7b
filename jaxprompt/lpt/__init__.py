"""LPT (Dong et al., ICLR 2023) with its VPT-deep and linear-probe baselines.

config.py (the recipe), train.py and baselines.py (the drivers), context.py, evaluate.py,
released.py, model.py, losses.py, data.py, samplers.py, transforms.py.
"""
