"""Reading and writing weight files as flat dicts of numpy arrays.

Every loader in jaxprompt is a pure function from such a dict to a Flax tree, so
the file formats live here once: `.npz` and `.safetensors` need nothing beyond
numpy; `.pt`/`.pth`/`.bin` (plain state dicts, wrapped checkpoints and OpenAI's
TorchScript archives) import torch lazily. `python -m jaxprompt.convert` turns a
torch file into an `.npz` that loads without torch.

Reading never runs code from a file: `.npz` object arrays are refused, torch
state dicts load with `torch.load(..., weights_only=True)` (tensors, containers,
numbers and an `argparse.Namespace` of training arguments), and OpenAI's
TorchScript archives go through `torch.jit.load`. A file that cannot be read
raises `WeightFileError` naming it (and the config field it came from, when the
caller says).
"""
from __future__ import annotations

import argparse
import os
import re
import zipfile
from typing import Any, Mapping, Optional, Union

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


class WeightMismatchError(ValueError):
  """A checkpoint does not fit the model; the message is a readable diff."""


class WeightFileError(ValueError):
  """A weight file that cannot be read (corrupt, wrong format, or unsafe to load)."""


def _where(path: str, field: Optional[str]) -> str:
  return f"{path!r}" + (f" (config field {field})" if field else "")


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


def _safe_globals() -> list:
  """Classes besides tensors that training checkpoints commonly hold and that are safe
  to rebuild (no code runs): argparse namespaces of arguments, numpy scalars."""
  out: list = [argparse.Namespace]
  core = getattr(np, "_core", None) or getattr(np, "core", None)
  scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
  if scalar is not None:
    out += [scalar, np.dtype]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
  return out


def read_torch(path: str, field: Optional[str] = None) -> dict[str, np.ndarray]:
  """A torch file's tensors as numpy: a (wrapped) state dict with `weights_only=True`, or
  an OpenAI TorchScript archive through `torch.jit.load`."""
  torch = _import_torch(path)
  where = _where(path, field)
  if _is_torchscript(path):
    try:
      obj = torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # pylint: disable=broad-except
      raise WeightFileError(f"cannot read {where} as a TorchScript archive: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
  else:
    try:
      with torch.serialization.safe_globals(_safe_globals()):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      found = re.search(r"GLOBAL ([\w.]+)", str(e))
      if found:  # the pickle names a class or function beyond the allowed ones
        raise WeightFileError(
            f"refusing to load {where}: it holds Python objects ({found.group(1)}) besides "
            f"tensors, containers and numbers, and unpickling them could run code from the "
            f"file. If you trust it, re-save only its state dict and pass that file") from None
      # Not torch's own text: it suggests weights_only=False, which would run the file.
      detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
      reason = detail.group(1).strip() if detail else f"{type(e).__name__}"
      if not detail and "Weights only" not in str(e):
        reason += f": {_first_line(e)}"
      raise WeightFileError(f"cannot read {where}: not a readable PyTorch file "
                            f"({reason})") from None
    try:
      obj = _unwrap(loaded, path)
    except ValueError as e:
      raise WeightFileError(f"{e}" + (f" (config field {field})" if field else "")) from None
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      out[strip_module(k)] = as_numpy(v)
  return out


def _first_line(e: BaseException, n: int = 200) -> str:
  line = (str(e).strip().splitlines() or [""])[0]
  return line if len(line) <= n else line[:n] + "..."


def _read_npz(path: str, where: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(path):
    raise WeightFileError(f"cannot read {where}: not an .npz (zip) archive")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "pickled" in str(e):
      raise WeightFileError(f"refusing to load {where}: it holds Python object arrays, not "
                            f"plain numeric arrays") from None
    raise WeightFileError(f"cannot read {where}: {_first_line(e)}") from None
  except Exception as e:  # pylint: disable=broad-except  # bad zip members, CRC errors
    raise WeightFileError(f"cannot read {where}: a damaged .npz archive "
                          f"({type(e).__name__}: {_first_line(e)})") from None


def read_arrays(path: str, field: Optional[str] = None) -> dict[str, np.ndarray]:
  """Reads a weight file into a flat `{name: float32/int array}` dict.

  `field` names the config field the path came from, for the error messages.
  """
  path = os.fspath(path)
  where = _where(path, field)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weight file not found: {where}")
  if os.path.isdir(path):
    raise WeightFileError(f"{where} is a directory, not a weight file")
  if path.endswith(".npz"):
    return _read_npz(path, where)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    try:
      return dict(load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise WeightFileError(f"cannot read {where}: not a valid .safetensors file "
                            f"({type(e).__name__}: {_first_line(e)})") from None
  if path.endswith(TORCH_SUFFIXES) or zipfile.is_zipfile(path):
    return read_torch(path, field)
  raise WeightFileError(f"{where}: unknown weight format; expected .npz, .safetensors or a "
                        f"torch file ({', '.join(TORCH_SUFFIXES)})")


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


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, Any]],
                    field: Optional[str] = None) -> tuple[dict[str, np.ndarray], str]:
  """(flat {name: array}, a label for messages) from a weight file or an in-memory state
  dict (unwrapped from 'state_dict' / 'model' / 'module' entries; `module.` stripped;
  non-array entries dropped)."""
  if isinstance(source, Mapping):
    for key in ("state_dict", "model", "module"):
      if key in source and isinstance(source[key], Mapping):
        source = source[key]
    return ({strip_module(k): as_numpy(v) for k, v in source.items() if hasattr(v, "shape")},
            "state dict")
  return ({strip_module(k): v for k, v in read_arrays(source, field).items()},
          repr(os.fspath(source)))
