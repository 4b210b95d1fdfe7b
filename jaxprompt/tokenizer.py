"""CLIP byte-level BPE tokenizer, id-for-id compatible with open_clip's `tokenize`.

The vocabulary file (`bpe_simple_vocab_16e6.txt.gz`) is not shipped in git; get it with
`python -m jaxprompt.tokenizer --fetch-vocab`, which pulls only the open_clip_torch wheel
(no dependencies) from the package index and extracts the file into `jaxprompt/assets/`.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import html
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Sequence

import ftfy
import numpy as np
import regex

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "JAXPROMPT_BPE_VOCAB"
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
OPEN_CLIP_WHEEL_VERSION = "3.3.0"
_WHEEL_MEMBER = "open_clip/" + VOCAB_NAME

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
SOT_ID = 49406
EOT_ID = 49407
# The vocabulary file holds more merges than CLIP uses; CLIP's vocab is 49408 entries:
# 256 bytes + 256 word-final bytes + 48894 merges + 2 specials.
_NUM_MERGES = 49152 - 256 - 2

_PATTERN = regex.compile(
    regex.escape(SOT_TOKEN) + "|" + regex.escape(EOT_TOKEN)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


class VocabNotFoundError(FileNotFoundError):
  """Raised when no copy of the BPE vocabulary can be located."""


def find_vocab(vocab_path: str | os.PathLike | None = None) -> pathlib.Path:
  """Locates the BPE vocabulary: explicit path, env var, package assets, installed open_clip."""
  if vocab_path is not None:
    p = pathlib.Path(vocab_path)
    if not p.is_file():
      raise VocabNotFoundError(f"BPE vocabulary not found at vocab_path={str(p)!r}")
    return p
  env = os.environ.get(VOCAB_ENV)
  if env:
    p = pathlib.Path(env)
    if not p.is_file():
      raise VocabNotFoundError(f"${VOCAB_ENV}={env!r} does not point to a file")
    return p
  p = ASSETS_DIR / VOCAB_NAME
  if p.is_file():
    return p
  try:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    spec = None
  # find_spec avoids importing open_clip (and torch) just to locate a data file.
  if spec is not None and spec.submodule_search_locations:
    for loc in spec.submodule_search_locations:
      cand = pathlib.Path(loc) / VOCAB_NAME
      if cand.is_file():
        return cand
  raise VocabNotFoundError(
      f"CLIP BPE vocabulary {VOCAB_NAME} not found. Run `python -m jaxprompt.tokenizer "
      f"--fetch-vocab` to put it in {ASSETS_DIR}, or set ${VOCAB_ENV}, or pass vocab_path.")


@functools.lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
  """Reversible byte -> printable unicode char map (GPT-2 style).

  Insertion order matters: the first 256 vocabulary ids follow it (printable bytes first).
  """
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  table = {b: chr(b) for b in printable}
  # Non-printable bytes are shifted above 255 so every byte maps to a visible char.
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + len(table) - len(printable))
  return table


class _BPE:
  """Loaded merges + vocabulary, with a per-word cache."""

  def __init__(self, path: pathlib.Path):
    with gzip.open(path, "rb") as f:
      lines = f.read().decode("utf-8").split("\n")
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    symbols = list(_byte_encoder().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.cache: dict[str, list[int]] = {SOT_TOKEN: [SOT_ID], EOT_TOKEN: [EOT_ID]}
    if self.encoder[SOT_TOKEN] != SOT_ID or self.encoder[EOT_TOKEN] != EOT_ID:
      raise ValueError(f"{path} does not look like CLIP's {VOCAB_NAME}")

  def _merge(self, word: str) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    inf = float("inf")
    while len(parts) > 1:
      pairs = set(zip(parts[:-1], parts[1:]))
      best = min(pairs, key=lambda p: self.ranks.get(p, inf))
      if best not in self.ranks:
        break
      first, second = best
      merged = []
      i = 0
      while i < len(parts):
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def word_ids(self, word: str) -> list[int]:
    ids = self.cache.get(word)
    if ids is None:
      benc = _byte_encoder()
      mapped = "".join(benc[b] for b in word.encode("utf-8"))
      ids = [self.encoder[p] for p in self._merge(mapped)]
      self.cache[word] = ids
    return ids


@functools.lru_cache(maxsize=8)
def _load_bpe(path: str) -> _BPE:
  return _BPE(pathlib.Path(path))


def clean_text(text: str) -> str:
  """ftfy fix, double html unescape, whitespace collapse, lower-case (CLIP's 'lower' clean)."""
  text = ftfy.fix_text(text)
  # Twice, because captions scraped from the web are often double-escaped.
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).strip().lower()


def encode(text: str, *, vocab_path: str | os.PathLike | None = None) -> list[int]:
  """BPE ids of one text, without SOT/EOT."""
  bpe = _load_bpe(str(find_vocab(vocab_path)))
  ids: list[int] = []
  for word in _PATTERN.findall(clean_text(text)):
    ids.extend(bpe.word_ids(word))
  return ids


def _shorten(text: str, n: int = 60) -> str:
  return text if len(text) <= n else text[:n - 3] + "..."


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False, *,
             vocab_path: str | os.PathLike | None = None) -> np.ndarray:
  """Token ids (N, context_length) int32: SOT, BPE ids, EOT, zero padding.

  Too-long texts raise ValueError unless `truncate`, which cuts and keeps EOT last.
  """
  if isinstance(texts, str):
    texts = [texts]
  if context_length < 2:
    raise ValueError(f"context_length must be >= 2, got {context_length}")
  out = np.zeros((len(texts), context_length), dtype=np.int32)
  for i, text in enumerate(texts):
    ids = [SOT_ID] + encode(text, vocab_path=vocab_path) + [EOT_ID]
    if len(ids) > context_length:
      if not truncate:
        raise ValueError(
            f"Text {_shorten(text)!r} has {len(ids)} tokens (with SOT/EOT), more than "
            f"context_length={context_length}; pass truncate=True to cut it.")
      ids = ids[:context_length]
      ids[-1] = EOT_ID
    out[i, :len(ids)] = ids
  return out


def extract_vocab_from_wheel(wheel_path: str | os.PathLike,
                             dest_dir: str | os.PathLike = ASSETS_DIR) -> pathlib.Path:
  """Copies open_clip's vocabulary out of a downloaded wheel into `dest_dir`."""
  dest_dir = pathlib.Path(dest_dir)
  dest_dir.mkdir(parents=True, exist_ok=True)
  dest = dest_dir / VOCAB_NAME
  with zipfile.ZipFile(wheel_path) as zf:
    try:
      data = zf.read(_WHEEL_MEMBER)
    except KeyError:
      raise FileNotFoundError(f"{_WHEEL_MEMBER} not in wheel {wheel_path}") from None
  # Write then rename so an interrupted copy never leaves a truncated vocab behind.
  tmp = dest.with_name(dest.name + ".part")
  tmp.write_bytes(data)
  os.replace(tmp, dest)
  return dest


def fetch_vocab(dest_dir: str | os.PathLike = ASSETS_DIR, *, force: bool = False) -> pathlib.Path:
  """Downloads the open_clip_torch wheel (no deps) with pip and extracts the vocabulary."""
  dest = pathlib.Path(dest_dir) / VOCAB_NAME
  if dest.is_file() and not force:
    return dest
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"open_clip_torch=={OPEN_CLIP_WHEEL_VERSION}", "-d", tmp]
    subprocess.run(cmd, check=True)
    wheels = sorted(pathlib.Path(tmp).glob("open_clip_torch-*.whl"))
    if not wheels:
      raise FileNotFoundError(f"pip download produced no open_clip_torch wheel in {tmp}")
    return extract_vocab_from_wheel(wheels[0], dest_dir)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jaxprompt.tokenizer", description=__doc__)
  parser.add_argument("--fetch-vocab", action="store_true",
                      help=f"download {VOCAB_NAME} into {ASSETS_DIR}")
  parser.add_argument("--force", action="store_true", help="re-download even if present")
  parser.add_argument("--context-length", type=int, default=77)
  parser.add_argument("text", nargs="*", help="texts to tokenize and print")
  args = parser.parse_args(argv)
  if args.fetch_vocab:
    print(fetch_vocab(force=args.force))
  if args.text:
    ids = tokenize(args.text, args.context_length, truncate=True)
    for t, row in zip(args.text, ids):
      print(t, "->", row[row != 0].tolist())
  if not args.fetch_vocab and not args.text:
    parser.print_help()


if __name__ == "__main__":
  main()
