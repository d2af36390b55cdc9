"""Model configurations, construction, and our checkpoint format.

A checkpoint is one directory::

    DIR/config.json   the ModelConfig plus provenance (what it was converted or trained from)
    DIR/params/       orbax checkpoint of the model's variables

``load_model(DIR)`` needs nothing else. The compute dtype (float32, or bfloat16 for speed on GPUs and TPUs) is
chosen when a model is loaded or built, not stored: ``load_model(DIR, dtype="bfloat16")`` (``modeling/precision.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pisam_jax import outputs
from pisam_jax.modeling.hq_decoder import MaskDecoderHQ
from pisam_jax.modeling.image_encoder import ENCODER_CONFIGS, ImageEncoderViT
from pisam_jax.modeling.mask_decoder import MaskDecoder
from pisam_jax.modeling import precision
from pisam_jax.modeling.pi_decoder import MaskDecoderPi, PiBase
from pisam_jax.modeling.prompt_encoder import PromptEncoder
from pisam_jax.modeling.transformer import TwoWayTransformer

MODEL_TYPES = tuple(ENCODER_CONFIGS)
DECODER_TYPES = ("sam", "hq", "pi")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


# ModelConfig fields that shape only the mask decoder (a training stage may choose them; the rest must match the
# SAM it starts from).
DECODER_FIELDS = ("decoder", "interactor", "pi_rgb_embedding", "pi_deformable", "pi_high_res")


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
    ``pi_base`` / ``pi_refine`` / ``decode_pi``). ``compute_dtype``: "float32" or "bfloat16" (``set_dtype``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.compute_dtype = "float32"
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
        *,
        for_gradient: bool = False,
    ) -> jax.Array:
        """The 1024^2 logits (B*P, 1, S, S) of ``base``: the interactor (with clicks) then the HR head.

        clicks: (points (B*P, N, 2) as (x, y) normalised to [0, 1] with pixel centres, i.e.
        ((x_px + 0.5) / S, (y_px + 0.5) / S) in the S x S input frame; labels (B*P, N): 1 foreground,
        0 background, -1 padding). The cheap step: re-run it alone for every new click set. ``for_gradient``:
        the training losses differentiate it (the HR head then runs in one band, ``MaskDecoderPi.head``).
        """
        self._require_pi()
        rgb = features.rgb
        if rgb is not None:
            rgb = jnp.repeat(rgb, base.hyper_in.shape[0] // rgb.shape[0], axis=0)  # one row per prompt
        banded = not for_gradient
        if clicks is None:
            return self.mask_decoder.refine(base, rgb, banded=banded)
        points, labels = clicks
        return self.mask_decoder.refine(base, rgb, points, jnp.maximum(labels, 0), labels < 0, banded=banded)

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


def check_dtype(dtype) -> str:
    """A compute dtype's name ("float32" or "bfloat16"), or a ModelError saying which there are."""
    try:
        return precision.check_dtype(dtype)
    except ValueError as e:
        raise ModelError(str(e)) from None


def set_dtype(model: Sam, dtype) -> Sam:
    """Sets ``model``'s compute dtype in place ("float32", "bfloat16", or None for float32); returns it.

    Parameters stay float32 (cast where used); see ``modeling/precision.py`` for what stays float32 in bfloat16.
    """
    name = check_dtype(dtype)
    precision.set_compute_dtype(model, name)
    model.compute_dtype = name
    return model


def with_dtype(model: Sam, dtype) -> Sam:
    """A model computing in ``dtype`` that shares ``model``'s parameters (no copy); ``model`` itself is unchanged."""
    name = check_dtype(dtype)
    if name == model.compute_dtype:
        return model
    return set_dtype(nnx.merge(*nnx.split(model)), name)


def build_model(config: ModelConfig, *, seed: int = 0, dtype=None) -> Sam:
    """A model with freshly initialised weights (PyTorch's default initialisation), computing in ``dtype``."""
    if config.decoder not in DECODER_TYPES:
        raise ModelError(f"unknown decoder {config.decoder!r}; expected one of {', '.join(DECODER_TYPES)}")
    return set_dtype(Sam(config, rngs=nnx.Rngs(seed)), dtype)


def abstract_model(config: ModelConfig, dtype=None) -> Sam:
    """The model's structure with shapes only (no memory, no compute): the target for loading weights."""
    return nnx.eval_shape(lambda: build_model(config, dtype=dtype))


def save_model(model: Sam, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Writes ``model`` to the directory ``path`` atomically: a temporary sibling renamed at the end.

    An existing ``path`` is an error unless ``overwrite``, and even then it is replaced only when it is a model
    directory (``is_model_dir``): the old one is moved aside, the new one renamed in, the old one removed.
    Temporaries of an earlier, killed save are removed first. Folders and files get their modes from the umask.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    _output(outputs.clean_stale, path.parent, path.name)
    check_output_dir(path, overwrite=overwrite)
    created = _output(outputs.make_parents, path)
    tmp = None
    try:
        tmp = _output(outputs.temp_folder_beside, path)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, nnx.state(model, nnx.Variable).to_pure_dict())
        checkpointer.wait_until_finished()
        config = json.dumps(model.config.to_json(), indent=2) + "\n"
        _output(outputs.write_file, tmp / CONFIG_FILE, config.encode())
        _output(outputs.replace_folder, tmp, path)
    except BaseException:  # Ctrl-C and SIGTERM (converters) too: nothing of this save is left
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        outputs.remove_created(created)
        raise
    return path


def _output(fn, *args):
    """``fn(*args)`` with failures to write reported as ModelError (one line: what, where, why)."""
    try:
        return fn(*args)
    except outputs.OutputError as e:
        raise ModelError(str(e)) from None
    except OSError as e:
        raise ModelError(f"cannot write {e.filename or args[-1]}: {e.strerror or e}") from None


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model directory as ``save_model`` writes it, holding nothing else."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    if set(os.listdir(path)) != {CONFIG_FILE, PARAMS_DIR} or not (path / PARAMS_DIR).is_dir():
        return False
    try:
        d = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "format_version" in d


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> None:
    """Raises ModelError unless a model directory can be written at ``path`` (before any work is done).

    ``path`` must not exist, or (with ``overwrite``) be a model directory, which is then replaced; the folders
    above it must exist or be creatable, and writable.
    """
    path = Path(path).absolute()
    if os.path.lexists(path):
        if not overwrite:
            raise ModelError(f"{flag} {path} already exists; choose another {flag}, or pass --overwrite to replace "
                             "it (only a model directory is replaced)")
        if path.is_symlink():
            raise ModelError(f"{flag} {path} is a symbolic link; give the folder itself, or a new one")
        if not is_model_dir(path):
            kind = "a file" if not path.is_dir() else "a folder that is not a pisam-jax model directory"
            raise ModelError(f"{flag} {path} is {kind}; --overwrite replaces only model directories ({CONFIG_FILE} "
                             f"and {PARAMS_DIR}/, nothing else), so choose another {flag}")
    try:
        outputs.check_parent(path, flag)
    except outputs.OutputError as e:
        raise ModelError(str(e)) from None


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig in a model directory's config.json (no parameters are read)."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in _TORCH_SUFFIXES:
            raise ModelError(
                f"{path} is a PyTorch checkpoint file; convert it to a model directory first (python -m convert.sam "
                f"--checkpoint {path} --out DIR; convert.hq_sam for HQ-SAM, convert.pisam for Pi-SAM), then give DIR"
            )
        raise ModelError(f"{path} is a file, not a model directory (a folder with {CONFIG_FILE} and {PARAMS_DIR}/)")
    if not path.is_dir():
        raise ModelError(
            f"model directory {path} does not exist; convert a checkpoint first "
            "(python -m convert.sam, convert.hq_sam or convert.pisam)"
        )
    config_file = path / CONFIG_FILE
    if not config_file.is_file() or not (path / PARAMS_DIR).is_dir():
        if (path / "checkpoints").is_dir():
            raise ModelError(f"{path} is a training workdir, not a model directory; give its export ({path}/export) "
                             f"or export a checkpoint: python -m pisam_jax.training.checkpoints {path} OUT")
        raise ModelError(f"{path} is not a pisam-jax model directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    try:
        d = json.loads(config_file.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return ModelConfig.from_json(d)
    except ModelError as e:
        raise ModelError(f"{config_file}: {e}") from None
    except (ValueError, TypeError) as e:
        raise ModelError(f"{config_file} is corrupt ({e}); convert or export the model again") from None


def load_model(path: str | os.PathLike, *, dtype=None) -> Sam:
    """Loads a model written by ``save_model`` (or by the converters), computing in ``dtype`` ("float32", the
    default, or "bfloat16"; the parameters are float32 either way).

    config.json is checked against the stored parameter shapes first, so an edited config never loads.
    """
    import orbax.checkpoint as ocp

    name = check_dtype(dtype)
    config = read_config(path)
    model = abstract_model(config, name)
    state = nnx.state(model, nnx.Variable)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.to_pure_dict())
    params = Path(path).absolute() / PARAMS_DIR
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = checkpointer.metadata(params).item_metadata
    except Exception as e:  # orbax raises many types; name the directory and the cause
        raise ModelError(f"cannot read the parameters in {Path(path) / PARAMS_DIR}: {first_line(e)}") from None
    _check_shapes(Path(path), target, stored)
    try:
        with quiet_if_restore_fails():
            restored = checkpointer.restore(params, target)
    except Exception as e:
        raise ModelError(f"cannot read the parameters in {Path(path) / PARAMS_DIR}: {first_line(e)}; the files "
                         "are damaged: convert or export the model again") from None
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _check_shapes(path: Path, target, stored) -> None:
    """config.json against the stored parameters: the same arrays with the same shapes, or a ModelError."""
    want = {_dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {_dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
    problems = [f"{k} is missing" for k in sorted(set(want) - set(have))]
    problems += [f"{k} is not in this model" for k in sorted(set(have) - set(want))]
    problems += [f"{k} is {have[k]}, the config makes {want[k]}" for k in sorted(set(want) & set(have))
                 if want[k] != have[k]]
    if problems:
        raise ModelError(f"{path / CONFIG_FILE} does not match the parameters in {path / PARAMS_DIR} "
                         f"({len(problems)} arrays differ; first: {problems[0]}); was config.json edited? "
                         "Restore it, or convert or export the model again")


@contextlib.contextmanager
def quiet_if_restore_fails():
    """Around an orbax restore: if it fails, what the failure leaves behind is silenced, so the caller's
    one-line error stays one line.

    On the first failed read orbax closes its event loop while the other tensorstore reads are in flight; each
    then reports "RuntimeError: Event loop is closed" through ``sys.unraisablehook`` (some while the first error
    is still on its way up, hence before, not after, the failure), or, finished with the same error, is logged
    as "Task (or Future) exception was never retrieved" when collected: dozens of tracebacks. Exactly those
    reports are dropped; everything else still goes where it went. A restore that succeeds leaves both hooks as
    they were.
    """
    import logging
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "quiets_orphaned_reads", False):  # an earlier failure's, still in place
        yield
        return

    def unraisablehook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    def retrieved(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Task exception was never retrieved",
                                               "Future exception was never retrieved"))

    unraisablehook.quiets_orphaned_reads = True
    sys.unraisablehook = unraisablehook
    logging.getLogger("asyncio").addFilter(retrieved)
    yield  # an exception from the restore leaves through here, the filters staying for the orphaned reads
    sys.unraisablehook = previous
    logging.getLogger("asyncio").removeFilter(retrieved)


def params_fingerprint(model: Sam) -> str:
    """sha256 over every variable's path, dtype, shape and bytes: identifies the weights behind a result.

    Independent of how the model was saved or loaded (two conversions of the same file agree).
    """
    digest = hashlib.sha256()
    flat = sorted(((_dotted(p), v) for p, v in nnx.state(model, nnx.Variable).flat_state()), key=lambda nv: nv[0])
    for name, var in flat:
        a = np.ascontiguousarray(jax.device_get(var.get_value()))
        digest.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.data)
    return digest.hexdigest()
