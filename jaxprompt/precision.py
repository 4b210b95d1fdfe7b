"""Mixed precision: bf16 compute, float32 parameters, optimizer state and losses.

The policy is one config string (`config.precision`: 'float32' or 'bfloat16').
Parameters and optimizer state always stay float32; the step casts the inputs
and the parameters it feeds to the forward pass to the compute dtype, models
take a `dtype` for their activations, and the loss is cast back to float32.
Gradients flow through the cast, so they arrive in float32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def compute_dtype(name: str | Any | None) -> Any:
  """The compute dtype for a config value ('bfloat16', 'float32', a dtype or None)."""
  if name is None:
    return jnp.float32
  if isinstance(name, str):
    if name not in _DTYPES:
      raise ValueError(f"unknown precision {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]
  return jnp.dtype(name).type


def cast_floating(tree: PyTree, dtype: Any) -> PyTree:
  """Cast floating-point leaves to `dtype`; integers, bools and keys are left alone."""
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def is_mixed(dtype: Any) -> bool:
  return jnp.dtype(dtype) != jnp.dtype(jnp.float32)
