"""Official HQ-SAM checkpoint (``sam_hq_vit_{b,l,h}.pth``, ``segment_anything_hq``) -> our checkpoint directory.

    python -m convert.hq_sam --checkpoint sam_hq_vit_l.pth --out checkpoints/hq_sam_vit_l [--model_type vit_l]

The file holds SAM's image encoder, prompt encoder and mask decoder plus HQ-SAM's decoder modules
(``mask_decoder.hf_token``, ``hf_mlp``, ``compress_vit_feat``, ``embedding_encoder``,
``embedding_maskfeature``); every key is consumed or the conversion fails, as for ``convert.sam``.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from convert.checkpoint import convert_official, define_convert_flags, run_cli

FLAGS = flags.FLAGS


def convert_hq_sam(checkpoint: str | Path, out: str | Path, *, model_type: str | None = None, overwrite: bool = False):
    """Converts and saves; returns the output directory. Every key is consumed or the conversion fails."""
    return convert_official(checkpoint, out, decoder="hq", model_type=model_type, overwrite=overwrite)


def main(argv):
    del argv
    out = convert_hq_sam(FLAGS.checkpoint, FLAGS.out, model_type=FLAGS.model_type, overwrite=FLAGS.overwrite)
    print(f"wrote {out}")


if __name__ == "__main__":
    define_convert_flags("Official HQ-SAM")  # here, not at import: convert.sam and convert.hq_sam can share a process
    run_cli(main)
