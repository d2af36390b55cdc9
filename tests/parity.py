"""One way to compare with a reference: report the errors, then assert them."""

from __future__ import annotations

import numpy as np


def assert_close(name: str, ours, reference, *, rtol: float, atol_scale: float | None = None) -> None:
    """Prints max abs / max rel error, then asserts |ours - ref| <= rtol * |ref| + atol.

    atol = (atol_scale or rtol) * max|ref|: values near zero are judged against the output's scale,
    not their own, as a relative error of a value that cancels to ~0 means nothing.
    """
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"{name}: shape {ours.shape} vs reference {reference.shape}"
    scale = float(np.abs(reference).max()) or 1.0
    err = np.abs(ours - reference)
    print(f"{name}: max abs err {err.max():.3e}, max rel err (to max|ref| {scale:.3e}) {err.max() / scale:.3e}")
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=(atol_scale or rtol) * scale, err_msg=name)
