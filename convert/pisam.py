"""Official SAM checkpoint + Pi-SAM decoder checkpoint -> one Pi-SAM model directory.

    python -m convert.pisam --sam_checkpoint sam_vit_h_4b8939.pth --pisam_checkpoint pisam_vit_h.pth \
        --out checkpoints/pisam_vit_h [--model_type vit_h]

(The dashed spellings, ``--sam-checkpoint`` etc., work too.)

  * image encoder and prompt encoder: from the SAM file (``image_encoder.*``, ``prompt_encoder.*``);
  * mask decoder: from the Pi-SAM file, the reference's ``MaskDecoderAE`` state_dict (PISAM_SPEC D1): 188 keys
    (stage 1) or 270 keys (stage 2, with ``interact_2.*``), raw or wrapped as ``{'model_state_dict': ...}``.
    It holds its own copy of SAM's decoder, which is what the reference runs, so that copy is used; whether it
    equals the SAM file's ``mask_decoder.*`` is recorded in the provenance;
  * ``rgb_embed``: the reference never saved it (spec 2.2); D2 fills it with the seed-42 weights its evaluation
    used, rebuilt with torch and ``segment_anything`` and checked against the spec's fingerprints.

Every key of both files is consumed (or, for the SAM file's ``mask_decoder.*``, deliberately superseded) or
the conversion fails listing them.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import flags

from convert.checkpoint import check_model_type, define_output_flags, detect_encoder, read_state_dict, run_cli, sha256
from convert.keymap import ConversionError, load_torch_weights
from pisam_jax.models import ModelConfig, abstract_model, check_output_dir, save_model

FLAGS = flags.FLAGS

RGB_SEED = 42
# PISAM_SPEC 2.2: sums of the seed-42 rgb_embed tensors.
RGB_FINGERPRINTS = {
    "vit_b": {"0.weight": 0.674056, "0.bias": 2.389177, "1.weight": -2.245842, "1.bias": 0.032592},
    "vit_l": {"0.weight": -1.715251, "0.bias": 0.353545, "1.weight": -1.616709, "1.bias": -0.057180},
    "vit_h": {"0.weight": -0.709881, "0.bias": -0.014582, "1.weight": -2.830590, "1.bias": -0.085113},
}
_FINGERPRINT_ATOL = 2e-6  # the table has 6 decimals
_PI_MODULES = ("mask_aspp.", "embedding_act.", "output_upscaling_2.", "out_act.")
_VIT_NAMES = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def seed42_rgb_embed(encoder: Mapping, seed: int = RGB_SEED) -> dict[str, np.ndarray]:
    """The reference's ``rgb_embed`` weights (torch layout), rebuilt as its ``main.py`` made them.

    Seed torch, build ``ImageEncoderViT`` with the model's configuration and ``PromptEncoder(256, (64, 64),
    (1024, 1024), 16)`` (only to consume the RNG as the reference did), then ``Conv2d(3, 8, 1)`` and
    ``Conv2d(8, 8, 3, padding=1)``. ``encoder``: detect_encoder's fields. Restores the global torch RNG.
    """
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, PromptEncoder

    state = torch.random.get_rng_state()
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            vit = ImageEncoderViT(
                depth=encoder["encoder_depth"],
                embed_dim=encoder["encoder_embed_dim"],
                img_size=encoder["image_size"],
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=encoder["encoder_num_heads"],
                patch_size=encoder["patch_size"],
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=tuple(encoder["encoder_global_attn_indexes"]),
                window_size=encoder["window_size"],
                out_chans=256,
            )
            del vit
            PromptEncoder(256, (64, 64), (1024, 1024), 16)
            rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1))
            return {k: v.numpy().copy() for k, v in rgb.state_dict().items()}
    finally:
        torch.random.set_rng_state(state)


def check_rgb_fingerprints(weights: Mapping[str, np.ndarray], model_type: str) -> str:
    """'verified' when the weights match the spec's sums for ``model_type``; 'no fingerprint (custom model)'
    for a non-official encoder. A mismatch is an error: the reconstruction would not be the reference's."""
    expected = RGB_FINGERPRINTS.get(model_type)
    if expected is None:
        return "no fingerprint (custom model)"
    got = {k: float(np.sum(weights[k], dtype=np.float64)) for k in expected}
    bad = [
        f"{k}: sum {got[k]:.6f}, expected {v:.6f}" for k, v in expected.items() if abs(got[k] - v) > _FINGERPRINT_ATOL
    ]
    if bad:
        raise ConversionError(
            f"the seed-{RGB_SEED} rgb_embed reconstruction for {model_type} does not match PISAM_SPEC 2.2 "
            f"({'; '.join(bad)}); the torch / segment_anything versions must consume the RNG as torch 2.x does"
        )
    return "verified"


def _pi_state_dict(path: Path, encoder: Mapping) -> tuple[dict, bool]:
    """Reads and checks the Pi-SAM decoder file; returns (state_dict, has the interactor)."""
    sd = read_state_dict(path)
    if sd and all(k.startswith("module.") for k in sd):  # a DDP-wrapped save
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith(("image_encoder.", "mask_decoder.")) for k in sd):
        raise ConversionError(
            f"{path.name} looks like a whole SAM / HQ-SAM model, not a Pi-SAM decoder checkpoint; "
            "pass it as --sam_checkpoint and the Pi-SAM decoder .pth as --pisam_checkpoint"
        )
    key = "compress_vit_feat.0.weight"
    if key not in sd or not any(k.startswith(_PI_MODULES) for k in sd):
        raise ConversionError(
            f"{path.name} is not a Pi-SAM decoder checkpoint (MaskDecoderAE state_dict): it lacks "
            + (key if key not in sd else "the Pi-SAM modules " + ", ".join(m.rstrip(".") for m in _PI_MODULES))
        )
    width = int(sd[key].shape[0])
    if width != encoder["encoder_embed_dim"]:
        raise ConversionError(
            f"model types differ: {path.name} is a Pi-SAM decoder for {_VIT_NAMES.get(width, 'a custom ViT')} "
            f"(ViT width {width}, from {key}) but the SAM checkpoint holds a {encoder['model_type']} encoder "
            f"(width {encoder['encoder_embed_dim']}); pass the SAM file of the same model type"
        )
    return sd, any(k.startswith("interact_2.") for k in sd)


def _check_sam_keys(name: str, sam_sd: Mapping) -> None:
    stray = sorted(k for k in sam_sd if not k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")))
    if stray:
        raise ConversionError(
            f"{name} has keys outside image_encoder / prompt_encoder / mask_decoder: " + ", ".join(stray)
        )
    hq = ("hf_token", "hf_mlp", "compress_vit_feat")
    if any(k.startswith("mask_decoder.") and k.split(".")[1] in hq for k in sam_sd):
        raise ConversionError(f"{name} is an HQ-SAM checkpoint; pass Meta's SAM checkpoint as --sam_checkpoint")


def _same_sam_decoder(sam_sd: Mapping, pi_sd: Mapping) -> bool:
    """Whether the Pi-SAM file's copy of SAM's decoder equals the SAM file's (it should: it was frozen)."""
    sam_dec = {k[len("mask_decoder."):]: v for k, v in sam_sd.items() if k.startswith("mask_decoder.")}
    return bool(sam_dec) and all(k in pi_sd and bool((pi_sd[k] == v).all()) for k, v in sam_dec.items())


def convert_pisam(
    sam_checkpoint: str | Path,
    pisam_checkpoint: str | Path,
    out: str | Path,
    *,
    model_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Converts and saves; returns the output directory. Nothing is written unless everything matched."""
    sam_checkpoint, pisam_checkpoint = Path(sam_checkpoint), Path(pisam_checkpoint)
    check_output_dir(out, overwrite=overwrite)  # before the (long) reads
    sam_sd = read_state_dict(sam_checkpoint)
    encoder = detect_encoder(sam_sd)
    check_model_type(encoder["model_type"], model_type)
    _check_sam_keys(sam_checkpoint.name, sam_sd)
    pi_sd, interactor = _pi_state_dict(pisam_checkpoint, encoder)

    rgb = seed42_rgb_embed(encoder)
    rgb_status = check_rgb_fingerprints(rgb, encoder["model_type"])
    config = ModelConfig(
        **encoder,
        decoder="pi",
        interactor=interactor,
        provenance={
            "converted_from": {
                "sam": sam_checkpoint.name,
                "sam_sha256": sha256(sam_checkpoint),
                "pisam": pisam_checkpoint.name,
                "pisam_sha256": sha256(pisam_checkpoint),
                "pisam_keys": len(pi_sd),
                "stage": 2 if interactor else 1,
            },
            "sam_decoder_from": "pisam checkpoint",
            "sam_decoder_equals_sam_checkpoint": _same_sam_decoder(sam_sd, pi_sd),
            "rgb_embed": {
                "source": f"reconstructed: torch seed {RGB_SEED}, ImageEncoderViT, PromptEncoder, Conv2d(3,8,1), "
                "Conv2d(8,8,3,padding=1) (PISAM_SPEC 2.2, D2)",
                "fingerprint": rgb_status,
            },
            "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    model = abstract_model(config)
    load_torch_weights(model.image_encoder, sam_sd, "image_encoder.", progress=f"encoder from {sam_checkpoint.name}")
    load_torch_weights(model.prompt_encoder, sam_sd, "prompt_encoder.")
    decoder_sd = {**pi_sd, **{f"rgb_embed.{k}": v for k, v in rgb.items()}}
    load_torch_weights(model.mask_decoder, decoder_sd, progress=f"decoder from {pisam_checkpoint.name}")
    return save_model(model, out, overwrite=overwrite)


def main(argv):
    del argv
    out = convert_pisam(
        FLAGS.sam_checkpoint, FLAGS.pisam_checkpoint, FLAGS.out, model_type=FLAGS.model_type, overwrite=FLAGS.overwrite
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    flags.DEFINE_string("sam_checkpoint", None, "Official SAM .pth (encoder and prompt encoder).", required=True)
    flags.DEFINE_string("pisam_checkpoint", None, "Pi-SAM decoder .pth (188 or 270 keys).", required=True)
    define_output_flags()
    run_cli(main)
