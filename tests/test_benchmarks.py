"""The benchmark scripts run (in their smoke-test sizes), so they cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import launcher

pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=1500):
  # One CPU device, as a user's run; quick compiles (tests/conftest.py): the smoke test
  # checks the rows, not the timings.
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=launcher.XLA_OPT)
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


@pytest.mark.slow
def test_make_bench_quick_writes_every_row(tmp_path):
  from benchmarks import run_all  # pylint: disable=import-outside-toplevel
  out, kept = tmp_path / "BENCHMARKS.md", tmp_path / "rows.jsonl"
  printed = _run(["benchmarks/run_all.py", "--quick", "--out", str(out), "--keep-json", str(kept)])
  text = out.read_text()
  rows = [l for l in text.splitlines() if l.startswith("| ") and "`python benchmarks/" in l]
  assert len(rows) == sum(run_all.row_count(cmd) for _, cmd in run_all.QUICK)
  for _, cmd in run_all.QUICK:
    assert f"`python benchmarks/{cmd}`" in text
  assert "No GPU figures were taken" in text
  for row in rows:  # the file says what the run printed
    assert row in printed
  # Both sides of a step pair compute the same loss on the same weights and batch (LPT's
  # A-GCL draws its noise from each framework's own generator, so its losses differ).
  steps = [json.loads(l) for l in kept.read_text().splitlines() if '"train_step"' in l]
  compared = [r for r in steps if r["model"] != "lpt"]
  assert {r["model"] for r in compared} == {"vit_b16", "rn50", "coop", "cocoop"}
  for r in compared:
    assert abs(r["loss_jax"] - r["loss_torch"]) <= 1e-3 * max(1.0, abs(r["loss_torch"])), r


@pytest.mark.slow
def test_gpu_script_tiny_mode(tmp_path):
  out = tmp_path / "gpu.json"
  printed = _run(["benchmarks/gpu.py", "--tiny", "--json", str(out)])
  results = json.loads(out.read_text())
  assert [(r["step"].split()[0], r["precision"]) for r in results] == [
      ("stage2", "float32"), ("stage2", "bfloat16"), ("LPT", "float32"), ("LPT", "bfloat16")]
  for r in results:
    assert r["img_s"] > 0 and r["step_s"] > 0 and r["tflop_per_step"] > 0
    assert r["mfu_vs_bf16_peak"] is None  # no peak known for a CPU
    assert r["loss"] == r["loss"]  # finite, not NaN
  assert "MFU n/a" in printed


def test_bf16_peaks_by_device_kind():
  from benchmarks import gpu  # pylint: disable=import-outside-toplevel
  assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert gpu.bf16_peak("NVIDIA H200") == 989e12
  assert gpu.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
  assert gpu.bf16_peak("cpu") is None
