"""Model configurations, construction, and our checkpoint format.

A checkpoint is one directory::

    DIR/config.json   the ModelConfig plus provenance (what it was converted or trained from)
    DIR/params/       orbax checkpoint of the model's variables

``load_model(DIR)`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pisam_jax.modeling.hq_decoder import MaskDecoderHQ
from pisam_jax.modeling.image_encoder import ENCODER_CONFIGS, ImageEncoderViT
from pisam_jax.modeling.mask_decoder import MaskDecoder
from pisam_jax.modeling.pi_decoder import MaskDecoderPi, PiBase
from pisam_jax.modeling.prompt_encoder import PromptEncoder
from pisam_jax.modeling.transformer import TwoWayTransformer

MODEL_TYPES = tuple(ENCODER_CONFIGS)
DECODER_TYPES = ("sam", "hq", "pi")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class ModelError(ValueError):
    """A model directory or configuration that cannot be used; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model. ``preset`` gives the official sizes."""

    model_type: str = "vit_b"
    decoder: str = "sam"
    image_size: int = 1024
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    prompt_embed_dim: int = 256
    # Pi-SAM only: whether the decoder has the Precise Interactor (stage 2) or not (stage 1).
    interactor: bool = False
    # Pi-SAM ablations (paper Table 5; ``MaskDecoderPi``): the RGB embedding, the Object Embedder's deformable
    # branches, the high-resolution output (False: the 256^2 mask, upsampled).
    pi_rgb_embedding: bool = True
    pi_deformable: bool = True
    pi_high_res: bool = True
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def preset(cls, model_type: str, decoder: str = "sam", **overrides) -> "ModelConfig":
        if model_type not in ENCODER_CONFIGS:
            raise ModelError(f"unknown model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        enc = ENCODER_CONFIGS[model_type]
        fields = dict(
            model_type=model_type,
            decoder=decoder,
            encoder_embed_dim=enc["embed_dim"],
            encoder_depth=enc["depth"],
            encoder_num_heads=enc["num_heads"],
            encoder_global_attn_indexes=tuple(enc["global_attn_indexes"]),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for 1024-px inputs)."""
        return self.image_size // self.patch_size

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return {"format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("format_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"unknown fields in {CONFIG_FILE}: {', '.join(unknown)}")
        d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
        return cls(**d)


@dataclasses.dataclass
class ImageFeatures:
    """What the image encoder computes once per image.

    embeddings: (B, 64, 64, 256); interm: outputs of the global-attention blocks, each (B, 64, 64, C_vit);
    rgb: Pi-SAM only, the decoder's RGB embedding of the normalised image (B, 1024, 1024, 8), else None;
    hq: HQ-SAM and Pi-SAM, the decoder's HQ features (B, 256, 256, 32) when cached for inference
    (``Sam.cache_hq_features``), else None: computed in every decode, as training needs for their gradient.
    """

    embeddings: jax.Array
    interm: tuple[jax.Array, ...]
    rgb: jax.Array | None = None
    hq: jax.Array | None = None


jax.tree_util.register_dataclass(ImageFeatures, data_fields=["embeddings", "interm", "rgb", "hq"], meta_fields=[])


class Sam(nnx.Module):
    """Segment Anything: ``image_encoder``, ``prompt_encoder``, ``mask_decoder`` as in ``segment_anything.Sam``.

    ``config.decoder`` picks the mask decoder: "sam" (``MaskDecoder``), "hq" (HQ-SAM's ``MaskDecoderHQ``) or
    "pi" (Pi-SAM's ``MaskDecoderPi``, with ``interact_2`` when ``config.interactor``; decoded with
    ``pi_base`` / ``pi_refine`` / ``decode_pi``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.image_encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            out_chans=config.prompt_embed_dim,
            window_size=config.window_size,
            global_attn_indexes=config.encoder_global_attn_indexes,
            rngs=rngs,
        )
        grid = config.embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=16,
            rngs=rngs,
        )
        self.mask_decoder = _build_mask_decoder(config, rngs)

    def encode(self, images: jax.Array) -> ImageFeatures:
        """images: (B, S, S, 3) normalised and padded (``transforms.preprocess``)."""
        embeddings, interm = self.image_encoder(images)
        rgb = self.mask_decoder.rgb_embedding(images) if isinstance(self.mask_decoder, MaskDecoderPi) else None
        return ImageFeatures(embeddings, tuple(interm), rgb)

    def cache_hq_features(self, features: ImageFeatures) -> ImageFeatures:
        """``features`` with the HQ features computed once, for decoders that have them (HQ-SAM, Pi-SAM).

        For inference: every prompt on the image then reuses them (the PyTorch predictors recompute them per
        prompt). Other decoders, or features that already hold them, are returned unchanged.
        """
        if not isinstance(self.mask_decoder, MaskDecoderHQ):
            return features
        return dataclasses.replace(features, hq=self._hq_features(features))

    def _hq_features(self, features: ImageFeatures) -> jax.Array:
        if features.hq is not None:
            return features.hq
        return self.mask_decoder.hq_features(features.embeddings, features.interm[0])

    def decode(
        self,
        features: ImageFeatures,
        *,
        points: tuple[jax.Array, jax.Array] | None = None,
        boxes: jax.Array | None = None,
        masks: jax.Array | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Decodes P prompts for each of B images in one batched call.

        points: (coords (B, P, N, 2), labels (B, P, N)) in the model's input frame; boxes: (B, P, 4);
        masks: (B, P, 256, 256, 1) low-res logits. At least one prompt kind must be given.
        Returns low-res mask logits (B, P, M, 256, 256) and IoU predictions (B, P, M): M = 3 or 1 for
        SAM; M = 1 for HQ-SAM, whose ``hq_token_only`` returns the HQ mask alone (``MaskDecoderHQ.select_hq``).
        """
        if isinstance(self.mask_decoder, MaskDecoderPi):
            raise ValueError("a Pi-SAM model decodes boxes with pi_base / pi_refine / decode_pi, not decode")
        b, p = _prompt_batch(points, boxes, masks)
        flat = lambda x: None if x is None else x.reshape((b * p,) + x.shape[2:])  # noqa: E731
        sparse, dense = self.prompt_encoder(
            points=None if points is None else (flat(points[0]), flat(points[1])),
            boxes=flat(boxes),
            masks=flat(masks),
        )
        per_prompt = lambda x: jnp.repeat(x, p, axis=0)  # noqa: E731
        hq = {}
        if isinstance(self.mask_decoder, MaskDecoderHQ):  # HQ features once per image, then per prompt
            hq = dict(hq_token_only=hq_token_only, hq_features=per_prompt(self._hq_features(features)))
        elif hq_token_only:
            raise ValueError(f"hq_token_only needs an HQ-SAM model; this one has a {self.config.decoder!r} decoder")
        low_res, iou = self.mask_decoder(
            image_embeddings=per_prompt(features.embeddings),
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **hq,
        )
        return low_res.reshape((b, p) + low_res.shape[1:]), iou.reshape((b, p) + iou.shape[1:])

    # -- Pi-SAM: box -> cached base features -> (clicks ->) 1024^2 mask --------------------------

    def pi_base(self, features: ImageFeatures, boxes: jax.Array) -> PiBase:
        """Everything that depends on the box only, computed once per box (PISAM_SPEC 3.1 steps A-D).

        boxes: (B, P, 4) (x0, y0, x1, y1) in the model's input frame. Returns a PiBase whose arrays have a
        leading B * P axis (image-major): E (B*P, 256, 256, 32), hyper_in (B*P, 1, 32), low_res (B*P, 1, 256, 256).
        """
        self._require_pi()
        b, p = boxes.shape[:2]
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.reshape(b * p, 4), masks=None)
        decoder = self.mask_decoder
        per_prompt = lambda x: jnp.repeat(x, p, axis=0)  # noqa: E731
        return decoder.base(
            per_prompt(features.embeddings), self.prompt_encoder.get_dense_pe(), sparse, dense,
            per_prompt(self._hq_features(features)),  # once per image
        )

    def pi_refine(
        self,
        features: ImageFeatures,
        base: PiBase,
        clicks: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """The 1024^2 logits (B*P, 1, S, S) of ``base``: the interactor (with clicks) then the HR head.

        clicks: (points (B*P, N, 2) as (x, y) normalised to [0, 1] with pixel centres, i.e.
        ((x_px + 0.5) / S, (y_px + 0.5) / S) in the S x S input frame; labels (B*P, N): 1 foreground,
        0 background, -1 padding). The cheap step: re-run it alone for every new click set.
        """
        self._require_pi()
        rgb = features.rgb
        if rgb is not None:
            rgb = jnp.repeat(rgb, base.hyper_in.shape[0] // rgb.shape[0], axis=0)  # one row per prompt
        if clicks is None:
            return self.mask_decoder.refine(base, rgb)
        points, labels = clicks
        return self.mask_decoder.refine(base, rgb, points, jnp.maximum(labels, 0), labels < 0)

    def decode_pi(
        self,
        features: ImageFeatures,
        boxes: jax.Array,
        clicks: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Box (and clicks) -> (low-res logits (B, P, 1, 256, 256), 1024^2 logits (B, P, 1, S, S)).

        clicks as :meth:`pi_refine` but shaped (B, P, N, 2) and (B, P, N).
        """
        b, p = boxes.shape[:2]
        base = self.pi_base(features, boxes)
        if clicks is not None:
            clicks = (clicks[0].reshape((b * p,) + clicks[0].shape[2:]), clicks[1].reshape(b * p, -1))
        large = self.pi_refine(features, base, clicks)
        return base.low_res.reshape((b, p) + base.low_res.shape[1:]), large.reshape((b, p) + large.shape[1:])

    def _require_pi(self) -> None:
        if not isinstance(self.mask_decoder, MaskDecoderPi):
            raise ValueError(f"this needs a Pi-SAM model; this one has a {self.config.decoder!r} decoder")


def _build_mask_decoder(config: ModelConfig, rngs: nnx.Rngs) -> MaskDecoder:
    """SAM's decoder sizes (``segment_anything.build_sam``); HQ-SAM adds the ViT width for its HQ features."""
    sam_decoder = dict(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=config.prompt_embed_dim, num_heads=8, mlp_dim=2048, rngs=rngs
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        rngs=rngs,
    )
    if config.decoder == "hq":
        return MaskDecoderHQ(vit_dim=config.encoder_embed_dim, **sam_decoder)
    if config.decoder == "pi":
        # E is 4x the embedding grid: 256^2 at 1024 input (the interactor's img_pe follows it).
        return MaskDecoderPi(
            vit_dim=config.encoder_embed_dim,
            interactor=config.interactor,
            interactor_hw=4 * config.embedding_size,
            rgb_embedding=config.pi_rgb_embedding,
            deformable=config.pi_deformable,
            high_res=config.pi_high_res,
            **sam_decoder,
        )
    return MaskDecoder(**sam_decoder)


def _prompt_batch(points, boxes, masks) -> tuple[int, int]:
    given = [x.shape[:2] for x in (None if points is None else points[0], boxes, masks) if x is not None]
    if not given:
        raise ValueError("decode needs at least one of points, boxes or masks")
    if len(set(given)) != 1:
        raise ValueError(f"prompts disagree on (batch, prompts): {given}")
    return given[0]


def build_model(config: ModelConfig, *, seed: int = 0) -> Sam:
    """A model with freshly initialised weights (PyTorch's default initialisation)."""
    if config.decoder not in DECODER_TYPES:
        raise ModelError(f"unknown decoder {config.decoder!r}; expected one of {', '.join(DECODER_TYPES)}")
    return Sam(config, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig) -> Sam:
    """The model's structure with shapes only (no memory, no compute): the target for loading weights."""
    return nnx.eval_shape(lambda: build_model(config))


def save_model(model: Sam, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``model`` to the directory ``path`` atomically: a temporary sibling renamed at the end."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise ModelError(f"{path} already exists; choose another --out or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, nnx.state(model, nnx.Variable).to_pure_dict())
        checkpointer.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(
            f"model directory {path} does not exist; convert a checkpoint first (python -m convert.sam or convert.hq_sam)"
        )
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise ModelError(f"{path} is not a pisam-jax model directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    try:
        return ModelConfig.from_json(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelError(f"{config_file} is corrupt: {e}") from None


def load_model(path: str | os.PathLike) -> Sam:
    """Loads a model written by ``save_model`` (or by the converters)."""
    import orbax.checkpoint as ocp

    config = read_config(path)
    model = abstract_model(config)
    state = nnx.state(model, nnx.Variable)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict())
    try:
        restored = ocp.StandardCheckpointer().restore(Path(path).absolute() / PARAMS_DIR, target)
    except Exception as e:  # orbax raises many types; name the directory and the cause
        raise ModelError(f"cannot read the parameters in {Path(path) / PARAMS_DIR}: {e}") from None
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
