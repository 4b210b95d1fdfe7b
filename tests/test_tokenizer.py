from __future__ import annotations

import gzip
import zipfile

import numpy as np
import pytest

from jaxprompt import tokenizer as tk

TEXTS = [
    "A photo of a X X X X person.",
    "a photo of a dog",
    "Hello, World!!! How's it going? I'm fine; they'll see: we've won (3-2).",
    "Numbers 1234567890 and 3.14159, 1e-6, 0x1F, 42nd street",
    "Café naïve résumé façade Ångström Straße",
    "Tom &amp; Jerry &lt;b&gt;bold&lt;/b&gt; &amp;amp; &quot;q&quot; &#39;s",
    "北京欢迎你 東京タワー 서울",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "emoji 😀🐶👍🏽 and ❤️ and 🇫🇷",
    "   lots   of\t\twhitespace \n\n between  words   ",
    "",
    "UPPER lower MiXeD CaSe",
    "don't won't can't shouldn't 'quoted' ''double''",
    "<start_of_text> inside text <end_of_text>",
    "mojibake: The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "tabs\tand\u00a0nbsp\u2003em-space and zero\u200bwidth",
    "hyphen-ated under_scored slash/ed dots...ellipsis",
    "x" * 300,
]


@pytest.fixture(scope="module")
def oc_tokenize():
  open_clip = pytest.importorskip("open_clip")
  return open_clip.tokenize


def test_matches_open_clip(oc_tokenize):
  ours = tk.tokenize(TEXTS, truncate=True)
  ref = oc_tokenize(TEXTS).numpy()
  assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
  for t, a, b in zip(TEXTS, ours, ref):
    np.testing.assert_array_equal(a, b, err_msg=repr(t))


@pytest.mark.parametrize("ctx", [5, 16, 32, 77, 100])
def test_other_context_lengths(oc_tokenize, ctx):
  ours = tk.tokenize(TEXTS, ctx, truncate=True)
  ref = oc_tokenize(TEXTS, context_length=ctx).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_clipreid_template():
  ids = tk.tokenize("A photo of a X X X X person.")
  expect = [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 2533, 269, 49407]
  assert ids.shape == (1, 77)
  assert ids[0, :12].tolist() == expect
  assert not ids[0, 12:].any()


def test_empty_and_single_string():
  ids = tk.tokenize("")
  assert ids[0, :2].tolist() == [tk.SOT_ID, tk.EOT_ID] and not ids[0, 2:].any()
  np.testing.assert_array_equal(tk.tokenize("a dog"), tk.tokenize(["a dog"]))


def test_too_long_raises_and_truncates(oc_tokenize):
  text = "a very long caption " * 30
  with pytest.raises(ValueError, match=r"has \d+ tokens") as e:
    tk.tokenize(["short", text])
  assert "a very long caption" in str(e.value)
  ids = tk.tokenize(text, truncate=True)
  assert ids[0, -1] == tk.EOT_ID and ids[0, 0] == tk.SOT_ID
  np.testing.assert_array_equal(ids, oc_tokenize(text).numpy())
  # Exactly full (75 BPE ids + SOT + EOT) fits without truncation.
  exact = " ".join(["dog"] * 75)
  assert tk.tokenize(exact)[0, -1] == tk.EOT_ID
  with pytest.raises(ValueError):
    tk.tokenize(exact + " dog")


def test_vocab_resolution(tmp_path, monkeypatch):
  src = tk.find_vocab()
  copy = tmp_path / tk.VOCAB_NAME
  copy.write_bytes(src.read_bytes())
  assert tk.find_vocab(copy) == copy
  monkeypatch.setenv(tk.VOCAB_ENV, str(copy))
  assert tk.find_vocab() == copy
  np.testing.assert_array_equal(tk.tokenize("a cat", vocab_path=copy), tk.tokenize("a cat"))
  with pytest.raises(tk.VocabNotFoundError):
    tk.find_vocab(tmp_path / "missing.gz")
  monkeypatch.setenv(tk.VOCAB_ENV, str(tmp_path / "missing.gz"))
  with pytest.raises(tk.VocabNotFoundError):
    tk.find_vocab()


def test_missing_vocab_message(tmp_path, monkeypatch):
  monkeypatch.delenv(tk.VOCAB_ENV, raising=False)
  monkeypatch.setattr(tk, "ASSETS_DIR", tmp_path)
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(tk.VocabNotFoundError, match="--fetch-vocab"):
    tk.find_vocab()


def test_extract_vocab_from_fake_wheel(tmp_path):
  payload = gzip.compress(b"header\nfake merges\n")
  wheel = tmp_path / "open_clip_torch-0.0.0-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr("open_clip/__init__.py", "")
    zf.writestr("open_clip/" + tk.VOCAB_NAME, payload)
  dest = tk.extract_vocab_from_wheel(wheel, tmp_path / "assets")
  assert dest == tmp_path / "assets" / tk.VOCAB_NAME
  assert dest.read_bytes() == payload
  # Idempotent: fetch_vocab finds it present and never calls pip.
  assert tk.fetch_vocab(tmp_path / "assets") == dest

  bad = tmp_path / "bad.whl"
  with zipfile.ZipFile(bad, "w") as zf:
    zf.writestr("open_clip/__init__.py", "")
  with pytest.raises(FileNotFoundError, match=tk.VOCAB_NAME):
    tk.extract_vocab_from_wheel(bad, tmp_path / "other")
