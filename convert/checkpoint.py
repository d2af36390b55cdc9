"""Reading official PyTorch checkpoints safely, and what every converter shares."""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from absl import app, flags

from convert.keymap import ConversionError, load_torch_weights, torch_names
from pisam_jax.models import (ENCODER_CONFIGS, MODEL_TYPES, ModelConfig, ModelError, abstract_model,
                              check_output_dir, save_model)
from pisam_jax.cli import parse_absl_flags
from pisam_jax.outputs import OutputError

_WRAPPERS = ("model_state_dict", "state_dict", "model")


def read_state_dict(path: str | os.PathLike) -> dict[str, "object"]:
    """Loads a ``.pth`` state_dict with ``weights_only=True`` (a checkpoint never runs code).

    Accepts a raw state_dict or one wrapped under ``model_state_dict``/``state_dict``/``model``.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"checkpoint {path} is a folder; give the official .pth file")
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist")
    import torch  # after the checks: a mistake is reported in a second
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


# The modules HQ-SAM adds to SAM's mask decoder; a checkpoint with any of them is an HQ-SAM one.
HQ_MODULES = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
_CONVERTERS = {"sam": "convert.sam", "hq": "convert.hq_sam"}
_SOURCE_NAMES = {"sam": "sam", "hq": "hq_sam"}


def _is_hq_key(key: str) -> bool:
    return key.startswith(tuple(f"mask_decoder.{m}." for m in HQ_MODULES))


def detect_decoder(state_dict: Mapping[str, object]) -> str:
    """'hq' for an HQ-SAM checkpoint (it has HQ-SAM's decoder modules), else 'sam'."""
    return "hq" if any(_is_hq_key(k) for k in state_dict) else "sam"


def convert_official(
    checkpoint: str | Path,
    out: str | Path,
    *,
    decoder: str,
    model_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """An official SAM (``decoder="sam"``) or HQ-SAM (``"hq"``) ``.pth`` -> our model directory.

    Reads the ViT's configuration off the shapes, checks the file holds the requested kind of model,
    fills every parameter and fails, listing them, on any missing, unexpected or mis-shaped key.
    Nothing is written unless the whole conversion succeeded. Returns the output directory.
    """
    check_output_dir(out, overwrite=overwrite)  # before the (long) read
    state_dict = read_state_dict(checkpoint)
    encoder = detect_encoder(state_dict)
    check_model_type(encoder["model_type"], model_type)
    config = ModelConfig(
        **encoder,
        decoder=decoder,
        provenance={
            "converted_from": {_SOURCE_NAMES[decoder]: Path(checkpoint).name, "sha256": sha256(checkpoint)},
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    model = abstract_model(config)
    _check_decoder_kind(Path(checkpoint).name, state_dict, decoder, model)
    load_torch_weights(model, state_dict, progress=f"converting {Path(checkpoint).name}")
    return save_model(model, out, overwrite=overwrite)


def _check_decoder_kind(name: str, state_dict, decoder: str, model) -> None:
    """A SAM file given to the HQ-SAM converter (or the reverse) gets one message saying so."""
    found = detect_decoder(state_dict)
    if found == decoder:
        return
    if decoder == "hq":
        hq_keys = sorted(key for key, _ in torch_names(model).values() if _is_hq_key(key))
        raise ConversionError(
            f"{name} is a SAM checkpoint, not HQ-SAM: it lacks HQ-SAM's decoder keys ({len(hq_keys)}): "
            + ", ".join(hq_keys)
            + f"; convert it with python -m {_CONVERTERS[found]}"
        )
    raise ConversionError(
        f"{name} is an HQ-SAM checkpoint (it has mask_decoder.{{{', '.join(HQ_MODULES)}}}); "
        f"convert it with python -m {_CONVERTERS[found]}"
    )


def define_convert_flags(what: str) -> None:
    """The flags every converter takes: --checkpoint --out --model_type --overwrite."""
    flags.DEFINE_string("checkpoint", None, f"{what} .pth file.", required=True)
    define_output_flags()


def define_output_flags() -> None:
    """--out --model_type --overwrite (every converter)."""
    flags.DEFINE_string("out", None, "Output model directory (must not exist, unless --overwrite).", required=True)
    flags.DEFINE_enum("model_type", None, MODEL_TYPES, "vit_b, vit_l or vit_h; detected from the shapes if omitted.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it is a model directory: the new one is written beside "
                      "it, then swapped in, then the old one is removed. Anything else at --out is never replaced.")


def underscore_flags(argv: list[str]) -> list[str]:
    """``--model-type=x`` -> ``--model_type=x`` (absl knows only the underscore spelling)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        out.append(arg)
    return out


def run_cli(main) -> None:
    """absl entry point whose user errors print one line and exit with status 2.

    Dashed flag spellings are accepted (``--model-type``); SIGTERM unwinds like Ctrl-C, so a killed conversion
    still removes its temporary folder (SIGKILL cannot be caught: the next run removes it).
    """
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    def wrapped(argv):
        from absl import logging

        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
        try:
            main(argv)
        except (ConversionError, ModelError, OutputError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    signal.signal(signal.SIGTERM, terminate)
    sys.argv = sys.argv[:1] + underscore_flags(sys.argv[1:])
    app.run(wrapped, flags_parser=parse_absl_flags)
