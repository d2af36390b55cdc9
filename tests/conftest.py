"""Shared test setup: fp32 parity with the highest matmul precision, repo root importable."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """A tiny random SAM: (torch Sam, its official-format .pth, our converted model directory)."""
    from convert.sam import convert_sam
    from references.sam import TINY, build_torch_sam, save_official

    root = tmp_path_factory.mktemp("tiny_sam")
    sam = build_torch_sam(**TINY)
    save_official(sam, root / "sam_tiny.pth")
    return sam, root / "sam_tiny.pth", convert_sam(root / "sam_tiny.pth", root / "converted")


@pytest.fixture
def accelerator_paths(monkeypatch):
    """Runs the code paths written for GPUs and TPUs (whole-array attention, the HR head layer by layer, several
    deformable-conv taps per step) on the CPU, where they are not the default (``modeling.common.CODE_PATHS``)."""
    from pisam_jax.modeling import common

    monkeypatch.setattr(common, "CODE_PATHS", "accelerator")
