"""CLIP-ReID (Li et al., AAAI 2023) and its CLIP baseline.

config.py (the recipe), train.py (the driver), context.py, evaluate.py, released.py, model.py,
losses.py, data.py, samplers.py, transforms.py, ranking.py, reranking.py, plots.py.
"""
