"""The XLA flag the GPU benchmarks set before JAX starts, and why it keeps the comparison fair.

``--xla_backend_extra_options=-nvptx-allow-ftz-atomics`` lets LLVM's NVPTX backend lower a float32 atomic add
(XLA's scatter-add: the input gradient of the deformable convolution, ``ops/deform_conv.py``) to the hardware's
``atom.add.f32`` / ``red.add.f32``. That instruction always flushes subnormal inputs and results to zero, so
without the option LLVM expands every such add in a kernel that keeps subnormals into a compare-and-swap retry
loop (jaxlib 0.10.2: several times slower under contention). PyTorch needs no such flag: CUDA's
``atomicAdd(float*)``, which torchvision's deformable convolution uses for the same gradient, compiles to that
same flushing instruction. With the option both sides run the same atomic arithmetic; it changes nothing else
(ordinary arithmetic keeps its subnormals) and nothing on CPU.
"""

from __future__ import annotations

import os

FTZ_ATOMICS = "--xla_backend_extra_options=-nvptx-allow-ftz-atomics"


def set_gpu_xla_flags() -> None:
    """Adds ``FTZ_ATOMICS`` to ``XLA_FLAGS`` (once) when an NVIDIA GPU is visible; call before JAX initialises."""
    import torch

    flags = os.environ.get("XLA_FLAGS", "")
    if torch.cuda.is_available() and FTZ_ATOMICS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FTZ_ATOMICS}".strip()


def add_code_paths_flag(parser) -> None:
    """``--code-paths cpu|accelerator``: which of the model's code paths run (``modeling.common.CODE_PATHS``);
    ``accelerator`` on a CPU runs the GPU/TPU paths (fused attention with its bias, whole-array heads)."""
    parser.add_argument("--code-paths", choices=["cpu", "accelerator"], default=None,
                        help="force the CPU or the accelerator code paths (default: the backend's own); "
                             "accelerator on a CPU: the GPU/TPU paths, e.g. to count their kernels")


def use_code_paths(name: str | None) -> None:
    """Sets the code paths ``--code-paths`` named (None: the backend's own)."""
    from pisam_jax.modeling import common

    common.CODE_PATHS = name


def code_paths() -> str:
    """Which code paths run: "cpu" or "accelerator" (``modeling.common.cpu_paths``)."""
    from pisam_jax.modeling import common

    return "cpu" if common.cpu_paths() else "accelerator"
