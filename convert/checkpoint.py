"""Reading official PyTorch checkpoints safely, and what every converter shares."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from absl import app

from convert.keymap import ConversionError
from pisam_jax.models import ENCODER_CONFIGS, ModelError

_WRAPPERS = ("model_state_dict", "state_dict", "model")


def read_state_dict(path: str | os.PathLike) -> dict[str, "object"]:
    """Loads a ``.pth`` state_dict with ``weights_only=True`` (a checkpoint never runs code).

    Accepts a raw state_dict or one wrapped under ``model_state_dict``/``state_dict``/``model``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({first_line})") from None
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state_dict of tensors")
    return dict(obj)


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def detect_encoder(state_dict: Mapping[str, object], prefix: str = "image_encoder.") -> dict:
    """The ViT's configuration, read off the tensor shapes.

    Returns ModelConfig fields plus ``model_type``: vit_b / vit_l / vit_h when the sizes are an
    official model's, else "custom" (as the small random checkpoints of the tests are).
    """
    key = prefix + "patch_embed.proj.weight"
    if key not in state_dict or prefix + "pos_embed" not in state_dict:
        raise ConversionError(f"not a SAM checkpoint: it has no {key}")
    width, _, patch, _ = state_dict[key].shape
    grid = state_dict[prefix + "pos_embed"].shape[1]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith(prefix + "blocks.")})
    # Decomposed rel-pos tables are (2 * size - 1, head_dim): global blocks span the grid, the others a window.
    spans = [(state_dict[f"{prefix}blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
    head_dim = state_dict[f"{prefix}blocks.0.attn.rel_pos_h"].shape[1]
    windows = {s for s in spans if s != grid}
    fields = dict(
        image_size=grid * patch,
        patch_size=patch,
        encoder_embed_dim=width,
        encoder_depth=depth,
        encoder_num_heads=width // head_dim,
        encoder_global_attn_indexes=tuple(i for i, s in enumerate(spans) if s == grid),
        window_size=windows.pop() if windows else 14,
    )
    official = {
        name: cfg for name, cfg in ENCODER_CONFIGS.items()
        if (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], tuple(cfg["global_attn_indexes"]))
        == (width, depth, fields["encoder_num_heads"], fields["encoder_global_attn_indexes"])
    }
    standard = fields["image_size"] == 1024 and patch == 16 and fields["window_size"] == 14
    fields["model_type"] = next(iter(official)) if official and standard else "custom"
    return fields


def check_model_type(detected: str, requested: str | None) -> str:
    if requested and requested != detected:
        raise ConversionError(f"the checkpoint holds a {detected} model but --model-type says {requested}")
    return detected


def run_cli(main) -> None:
    """absl entry point whose user errors print one line and exit with status 2."""

    def wrapped(argv):
        try:
            main(argv)
        except (ConversionError, ModelError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)

