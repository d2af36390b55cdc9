"""The one mapping between PyTorch state_dict keys and our nnx parameter paths.

Because our module tree mirrors the PyTorch one (DESIGN.md), a key is derived
from a path: ``('image_encoder', 'blocks', 3, 'attn', 'qkv', 'kernel')`` is
``image_encoder.blocks.3.attn.qkv.weight``. What remains is a small table of
leaf renames and layout transposes, keyed by the type of the owning module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from tqdm import tqdm
from flax import nnx

from pisam_jax.modeling.common import ConvTranspose2x2


class ConversionError(ValueError):
    """A PyTorch state_dict does not match the model it is loaded into."""


Layout = Callable[[np.ndarray], np.ndarray]

_identity: Layout = lambda w: w  # noqa: E731

# (owner module type, our leaf name) -> (torch leaf name, torch array -> our array)
_RULES: dict[tuple[type, str], tuple[str, Layout]] = {
    (nnx.Linear, "kernel"): ("weight", lambda w: w.T),  # (out, in) -> (in, out)
    (nnx.Conv, "kernel"): ("weight", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    (ConvTranspose2x2, "kernel"): ("weight", lambda w: w.transpose(0, 2, 3, 1)),  # (I,O,kh,kw) -> (I,kh,kw,O)
    (nnx.LayerNorm, "scale"): ("weight", _identity),
    (nnx.Embed, "embedding"): ("weight", _identity),
}


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch.Tensor, without importing torch here
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def torch_names(module: nnx.Module) -> dict[tuple, tuple[str, Layout]]:
    """Maps every Variable path of ``module`` to its torch key (without prefix) and layout."""
    owners = {path: node for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}
    names = {}
    for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Variable)):
        owner, leaf = owners[path[:-1]], path[-1]
        torch_leaf, layout = next(
            (rule for (kind, name), rule in _RULES.items() if isinstance(owner, kind) and name == leaf),
            (leaf, _identity),
        )
        names[path] = (".".join(str(p) for p in path[:-1] + (torch_leaf,)), layout)
    return names


def load_torch_weights(
    module: nnx.Module,
    state_dict: Mapping[str, object],
    prefix: str = "",
    *,
    ignore: Iterable[str] = (),
    strict: bool = True,
    progress: str | None = None,
) -> set[str]:
    """Fills every Variable of ``module`` from ``state_dict[prefix + key]``, in place.

    Works on modules built abstractly with ``nnx.eval_shape`` too. Keys under
    ``prefix`` that are neither consumed nor listed in ``ignore`` are unexpected.
    Raises ConversionError listing every missing, unexpected or mis-shaped key
    (unexpected keys only when ``strict``). Returns the set of consumed torch keys.
    ``progress``: a description for a progress bar over the keys (none if None).
    """
    ignore = set(ignore)
    missing, mismatched, consumed, updates = [], [], set(), []
    state = nnx.state(module, nnx.Variable)
    current = dict(nnx.to_flat_state(state))
    names = torch_names(module).items()
    for path, (key, layout) in tqdm(names, desc=progress, unit="key", disable=progress is None):
        key = prefix + key
        if key not in state_dict:
            missing.append(key)
            continue
        raw = _to_numpy(state_dict[key])
        value = layout(raw)
        consumed.add(key)
        expected = tuple(current[path].shape)
        if value.shape != expected:
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)}, ours {expected} (our layout)")
            continue
        updates.append((path, value.astype(current[path].dtype)))
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in consumed and k not in ignore)
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}): " + ", ".join(missing))
    if mismatched:
        problems.append(f"wrong shape ({len(mismatched)}): " + "; ".join(mismatched))
    if strict and unexpected:
        problems.append(f"unexpected in the checkpoint ({len(unexpected)}): " + ", ".join(unexpected))
    if problems:
        raise ConversionError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    for path, value in updates:
        current[path].set_value(value)  # set_value keeps the Variable's type and metadata
    return consumed
