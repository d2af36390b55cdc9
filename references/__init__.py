"""The PyTorch references that the parity tests (``tests/``) and the benchmarks (``bench/``) compare against.

``sam`` and ``hq``: random-weight SAM / HQ-SAM models from the PyPI packages, saved as the official checkpoints;
``pisam`` and ``pisam_interactor``: Pi-SAM's decoder and Precise Interactor written from PISAM_SPEC.md (the
official code is not public); ``losses``: the training losses (PISAM_SPEC.md 5.1). Not part of the installed
package: they need torch, segment-anything and segment-anything-hq (requirements-dev.txt).
"""
