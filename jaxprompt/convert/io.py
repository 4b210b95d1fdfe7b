"""Reading and writing weight files as flat dicts of numpy arrays.

Every loader in jaxprompt is a pure function from such a dict to a Flax tree, so
the file formats live here once: `.npz` and `.safetensors` need nothing beyond
numpy; `.pt`/`.pth`/`.bin` (plain state dicts, wrapped checkpoints and OpenAI's
TorchScript archives) import torch lazily. `python -m jaxprompt.convert` turns a
torch file into an `.npz` that loads without torch.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Mapping, Union

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


class WeightMismatchError(ValueError):
  """A checkpoint does not fit the model; the message is a readable diff."""


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"reading {path!r} needs PyTorch, which is not installed. Install torch, or convert "
        f"the file on a machine that has it: python -m jaxprompt.convert {path} OUT.npz") from e
  return torch


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("constants.pkl") or n.split("/")[-2:-1] == ["code"] for n in z.namelist())


def _unwrap(obj, path: str) -> Mapping:
  """Finds the state dict inside common checkpoint wrappers."""
  for key in ("state_dict", "model", "module", "model_state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
  return obj


def as_numpy(v) -> np.ndarray:
  """A torch tensor (fp16/bf16 upcast exactly to float32) or array-like -> numpy."""
  if hasattr(v, "detach"):
    v = v.detach().cpu()
    v = v.float() if v.dtype.is_floating_point else v
    return v.numpy()
  return np.asarray(v)


def read_torch(path: str) -> dict[str, np.ndarray]:
  torch = _import_torch(path)
  if _is_torchscript(path):
    obj = torch.jit.load(path, map_location="cpu").state_dict()
  else:
    obj = _unwrap(torch.load(path, map_location="cpu", weights_only=False), path)
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      k = k[len("module."):] if k.startswith("module.") else k
      out[k] = as_numpy(v)
  return out


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """Reads a weight file into a flat `{name: float32/int array}` dict."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {path!r}")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  if path.endswith(TORCH_SUFFIXES) or zipfile.is_zipfile(path):
    return read_torch(path)
  raise ValueError(f"{path!r}: unknown weight format; expected .npz, .safetensors or a torch "
                   f"file ({', '.join(TORCH_SUFFIXES)})")


def write_arrays(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes a flat dict as `.npz` (or `.safetensors`), atomically."""
  path = os.fspath(path)
  tmp = path + ".tmp"
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)
  elif path.endswith(".npz"):
    with open(tmp, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  else:
    raise ValueError(f"{path!r}: output must end in .npz or .safetensors")
  os.replace(tmp, path)


def check_names_and_shapes(expected: Mapping[str, tuple], got: Mapping[str, np.ndarray],
                           source: str = "checkpoint") -> None:
  """Raises `WeightMismatchError` with a diff when names or shapes differ.

  `expected` maps names to shapes (what the model needs), `got` maps the same
  names to arrays (what the file gave, after name mapping).
  """
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  bad = sorted(k for k in set(expected) & set(got)
               if tuple(np.shape(got[k])) != tuple(expected[k]))
  if not (missing or extra or bad):
    return
  lines = [f"{source} does not match the model:"]
  for k in missing:
    lines.append(f"  - missing   {k}  {tuple(expected[k])}")
  for k in extra:
    lines.append(f"  + unexpected {k}  {tuple(np.shape(got[k]))}")
  for k in bad:
    lines.append(f"  ~ shape     {k}  model {tuple(expected[k])} != file {tuple(np.shape(got[k]))}")
  raise WeightMismatchError("\n".join(lines))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  out: dict = {}
  for name, v in flat.items():
    node = out
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def strip_module(name: str) -> str:
  """A state-dict name without the `module.` prefix DataParallel / DDP checkpoints add."""
  return name[len("module."):] if name.startswith("module.") else name


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, Any]]
                    ) -> tuple[dict[str, np.ndarray], str]:
  """(flat {name: array}, a label for messages) from a weight file or an in-memory state
  dict (unwrapped from 'state_dict' / 'model' / 'module' entries; `module.` stripped;
  non-array entries dropped)."""
  if isinstance(source, Mapping):
    for key in ("state_dict", "model", "module"):
      if key in source and isinstance(source[key], Mapping):
        source = source[key]
    return ({strip_module(k): as_numpy(v) for k, v in source.items() if hasattr(v, "shape")},
            "state dict")
  return {strip_module(k): v for k, v in read_arrays(source).items()}, repr(os.fspath(source))
