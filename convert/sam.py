"""Official SAM checkpoint (``sam_vit_{b,l,h}_*.pth``) -> our checkpoint directory.

    python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out checkpoints/sam_vit_b [--model-type vit_b]
"""

from __future__ import annotations

import datetime
from pathlib import Path

from absl import flags

from convert.checkpoint import check_model_type, detect_encoder, read_state_dict, run_cli, sha256
from convert.keymap import load_torch_weights
from pisam_jax.models import MODEL_TYPES, ModelConfig, ModelError, abstract_model, save_model

flags.DEFINE_string("checkpoint", None, "Official SAM .pth file.", required=True)
flags.DEFINE_string("out", None, "Output model directory (must not exist).", required=True)
flags.DEFINE_enum("model_type", None, MODEL_TYPES, "vit_b, vit_l or vit_h; detected from the shapes if omitted.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
FLAGS = flags.FLAGS


def convert_sam(checkpoint: str | Path, out: str | Path, *, model_type: str | None = None, overwrite: bool = False):
    """Converts and saves; returns the output directory. Every key is consumed or the conversion fails."""
    if Path(out).exists() and not overwrite:
        raise ModelError(f"{out} already exists; choose another --out or pass --overwrite")
    state_dict = read_state_dict(checkpoint)
    encoder = detect_encoder(state_dict)
    check_model_type(encoder["model_type"], model_type)
    config = ModelConfig(
        **encoder,
        provenance={
            "converted_from": {"sam": Path(checkpoint).name, "sha256": sha256(checkpoint)},
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    model = abstract_model(config)
    load_torch_weights(model, state_dict, progress=f"converting {Path(checkpoint).name}")
    return save_model(model, out, overwrite=overwrite)


def main(argv):
    del argv
    out = convert_sam(FLAGS.checkpoint, FLAGS.out, model_type=FLAGS.model_type, overwrite=FLAGS.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
