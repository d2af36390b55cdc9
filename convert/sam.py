"""Official SAM checkpoint (``sam_vit_{b,l,h}_*.pth``) -> our checkpoint directory.

    python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out checkpoints/sam_vit_b [--model_type vit_b]
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from convert.checkpoint import convert_official, define_convert_flags, run_cli

FLAGS = flags.FLAGS


def convert_sam(checkpoint: str | Path, out: str | Path, *, model_type: str | None = None, overwrite: bool = False):
    """Converts and saves; returns the output directory. Every key is consumed or the conversion fails."""
    return convert_official(checkpoint, out, decoder="sam", model_type=model_type, overwrite=overwrite)


def main(argv):
    del argv
    out = convert_sam(FLAGS.checkpoint, FLAGS.out, model_type=FLAGS.model_type, overwrite=FLAGS.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    define_convert_flags("Official SAM")  # here, not at import: convert.sam and convert.hq_sam can share a process
    run_cli(main)
