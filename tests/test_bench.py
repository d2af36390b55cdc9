"""``bench/gpu.sh --small``: every case of the GPU comparison runs (tiny sizes, CPU) and reports both sides.

Speed is not asserted (it is measured in bench/, never tested); what is asserted is that the script a GPU session
will run works end to end: one JSON line per case with both sides' times, dtypes and devices and their ratio, and
a table row for each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "bench" / "gpu.sh"


def _small_labels() -> list[str]:
    """The labels of ``bench.gpu.cases(small=True)``, listed in a subprocess (importing bench.gpu imports JAX)."""
    code = "from bench.gpu import cases; print('\\n'.join(label for label, _ in cases(small=True)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_gpu_sh_small_reports_every_case_with_both_sides(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(["bash", str(GPU_SH), "--small", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads(line) for line in out.read_text().splitlines()]
    labels = _small_labels()
    for kind in ("SAM decoder", "HQ decoder", "Pi-SAM", "deformable conv forward 3x3", "deformable conv forward 7x7",
                 "deformable conv forward_backward", "train step", "float32", "bfloat16", "torch.compile"):
        assert any(kind in label for label in labels), kind
    assert [r["label"] for r in records if r["label"] != "Pi-SAM box / clicks"] == [
        label for label in labels if label != "Pi-SAM box / clicks"]
    assert sorted(r["case"] for r in records if r["label"] == "Pi-SAM box / clicks") == ["pi_box", "pi_clicks"]

    for r in records:
        assert "error" not in r and "skipped" not in r, r
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0, r
        ratio = r["ratio_ours_over_torch"]
        assert math.isfinite(ratio) and ratio > 0, r
        assert math.isclose(ratio, r["ours_ms"] / r["torch_ms"], rel_tol=0.01, abs_tol=1e-3), r
        assert r["ours_dtype"] == r["torch_dtype"] and r["ours_dtype"] in ("float32", "bfloat16"), r
        assert r["ours_device"].startswith("cpu") and r["torch_device"].startswith("cpu"), r
        assert ("bfloat16" in r["label"]) == (r["ours_dtype"] == "bfloat16"), r

    table = (tmp_path / "bench.md").read_text().splitlines()
    assert table[0].startswith("| case | ours ms | PyTorch ms | ratio |")
    rows = table[2:]
    assert len(rows) == len(records)
    for row, r in zip(rows, records, strict=True):
        assert row.startswith(f"| {r['label']}") and f"| {r['ours_dtype']} / {r['torch_dtype']} |" in row
    assert "\n".join(table) in proc.stdout


def test_gpu_sh_refuses_an_existing_output_and_leaves_it(tmp_path):
    out = tmp_path / "bench.jsonl"
    out.write_text("earlier results\n")
    proc = subprocess.run(["bash", str(GPU_SH), "--small", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"gpu.sh: {out} exists; move it away or name another output file"]
    assert out.read_text() == "earlier results\n"
    assert not (tmp_path / "bench.md").exists()


def test_gpu_sh_rejects_an_unknown_option():
    proc = subprocess.run(["bash", str(GPU_SH), "--tiny"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "gpu.sh: unknown option '--tiny'; usage: bash bench/gpu.sh [--small] [OUT.jsonl] [-- ARGS for python -m bench.gpu]")
