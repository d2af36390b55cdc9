"""Encode an image once, then prompt it many times: ``segment_anything.SamPredictor``'s contract in JAX.

    predictor = Predictor(load_model("checkpoints/sam_vit_b"))
    predictor.set_image(image)                       # (H, W, 3) RGB, uint8 or float 0..255; runs the encoder
    masks, scores, low_res = predictor.predict(box=np.array([x0, y0, x1, y1]))

HQ-SAM models (``convert.hq_sam``) take the same calls plus ``hq_token_only``, as
``segment_anything_hq.SamPredictor``; they return one mask per prompt.

Pi-SAM models (``convert.pisam``) take boxes; ``predict`` returns the 1024x1024 head's mask and
``refine([(x, y, is_foreground), ...])`` corrects it with clicks, re-running only the interactor
and the HR head on features cached per box:

    masks, _, low_res = predictor.predict(box=np.array([x0, y0, x1, y1]))
    masks = predictor.refine([(420, 310, True), (505, 122, False)])

Coordinates are (x, y) pixels of the original image. Each call after ``set_image``
runs only the prompt encoder and the decoder, jit-compiled once per prompt shape.

``Predictor(model, dtype="bfloat16")`` computes in bfloat16 (the model's own dtype by default; see
``load_model(DIR, dtype=...)``), sharing the model's float32 parameters.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pisam_jax import transforms
from pisam_jax.modeling.hq_decoder import MaskDecoderHQ
from pisam_jax.modeling.pi_decoder import PiBase
from pisam_jax.models import ImageFeatures, Sam, with_dtype


class PromptError(ValueError):
    """A prompt that cannot be used as given; the message names it."""


class Predictor:
    def __init__(self, model: Sam, dtype: str | None = None):
        """``dtype``: the compute dtype ("float32" or "bfloat16"); None keeps the model's own."""
        self.model = model if dtype is None else with_dtype(model, dtype)
        self.image_size = model.config.image_size
        graphdef, state = nnx.split(self.model)
        # The jitted calls take the parameters as a flat list of arrays: handing them a whole nnx.State costs ~1 ms
        # of Python per call (flattening it), as much as a prompt's decode on a GPU.
        self._params, treedef = jax.tree.flatten(state)
        merged = lambda params: nnx.merge(graphdef, jax.tree.unflatten(treedef, params))  # noqa: E731
        self._encode = jax.jit(lambda params, images: merged(params).encode(images))
        self._cache_hq = jax.jit(lambda params, features: merged(params).cache_hq_features(features))
        self._decode = jax.jit(partial(_decode, merged), static_argnames=("multimask_output", "hq_token_only"))
        self._pi_base = jax.jit(lambda params, features, boxes: merged(params).pi_base(features, boxes))
        self._pi_refine = jax.jit(
            lambda params, features, base, clicks: merged(params).pi_refine(features, base, clicks)
        )
        # Separate from the decoders, so a new image size recompiles two resizes, not a decoder.
        self._to_original = jax.jit(_to_original, static_argnames=("input_size", "original_size", "size", "logits"))
        self.reset_image()

    @property
    def is_pi(self) -> bool:
        return self.model.config.decoder == "pi"

    def reset_image(self) -> None:
        self.features: ImageFeatures | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.pi_base: PiBase | None = None  # Pi-SAM: the features of the last predicted boxes

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encodes ``image`` (H, W, 3) and keeps its features for the prompts that follow.

        uint8 is ``SamPredictor.set_image``'s input, bit for bit. A float image holds the same 0..255
        scale (not 0..1) and is used without rounding: resized (if its long side is not the model's
        input size) by the same filter in float, then normalised, as the Pi-SAM reference feeds its
        stretched float images (``evaluation.segmenter``, PISAM_SPEC 7.2).
        """
        image = _check_image(image)
        if image_format not in ("RGB", "BGR"):
            raise PromptError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR":
            image = image[..., ::-1]
        resized = transforms.resize_longest_side(image, self.image_size)
        model_input = transforms.preprocess(resized, self.image_size)
        features = self._encode(self._params, jnp.asarray(model_input)[None])
        self.set_features(features, image.shape[:2], resized.shape[:2])

    def set_features(self, features: ImageFeatures, original_size: tuple[int, int],
                     input_size: tuple[int, int]) -> None:
        """``set_image`` from encoder outputs computed elsewhere: ``Sam.encode`` of one preprocessed image.

        original_size: the image's (H, W); input_size: its (h, w) after ``resize_longest_side``. HQ-SAM and
        Pi-SAM models compute their HQ features here, once for all the prompts that follow.
        """
        self.reset_image()
        self.features = self._cache_hq(self._params, features)
        self.original_size, self.input_size = tuple(original_size), tuple(input_size)

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One prompt: points (N, 2) with labels (N,) (1 foreground, 0 background), a box (4,) x0 y0 x1 y1,
        and/or a previous low-res logit mask (1, 256, 256).

        Returns masks (C, H, W) (bool, or logits with ``return_logits``), scores (C,) and
        low-res logits (C, 256, 256); C = 3 with ``multimask_output`` else 1. HQ-SAM models return
        C = 1: with ``multimask_output`` the best-scored SAM mask, plus the HQ mask; with
        ``hq_token_only`` the HQ mask alone.
        """
        points = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise PromptError("point_coords and point_labels must be given together")
            points = (np.asarray(point_coords)[None], np.asarray(point_labels)[None])
        boxes = None if box is None else np.asarray(box).reshape(1, -1)
        masks = None if mask_input is None else np.asarray(mask_input)[None]
        out = self.predict_batch(points, boxes, masks, multimask_output, return_logits, hq_token_only)
        return tuple(x[0] for x in out)

    def predict_batch(
        self,
        points: tuple[np.ndarray, np.ndarray] | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """P prompts at once: points ((P, N, 2), (P, N)), boxes (P, 4), mask_input (P, 1, 256, 256).

        Returns masks (P, C, H, W), scores (P, C), low-res logits (P, C, 256, 256).
        """
        if hq_token_only and not isinstance(self.model.mask_decoder, MaskDecoderHQ):
            raise PromptError(f"hq_token_only needs an HQ-SAM model; this is a {self.model.config.decoder!r} model")
        if not self.is_image_set:
            raise RuntimeError("an image must be set with set_image(...) before predicting")
        if points is None and boxes is None and mask_input is None:
            raise PromptError("give at least one prompt: points, a box or a mask")
        if self.is_pi:
            if points is not None or mask_input is not None or boxes is None:
                raise PromptError("Pi-SAM is prompted with boxes; correct its mask with refine(clicks)")
            return self._predict_pi(boxes, return_logits)
        # Prompts enter the model with a leading image axis of 1: (1, P, ...).
        if points is not None:
            coords, labels = self._check_points(*points)
            points = (transforms.apply_coords(coords, self.original_size, self.image_size)[None], labels[None])
        if boxes is not None:
            boxes = transforms.apply_boxes(self._check_boxes(boxes), self.original_size, self.image_size)[None]
        if mask_input is not None:
            mask_input = self._check_masks(mask_input).transpose(0, 2, 3, 1)[None]
        scores, low_res = self._decode(
            self._params,
            self.features,
            points,
            boxes,
            mask_input,
            multimask_output=multimask_output,
            hq_token_only=bool(hq_token_only),
        )
        # Thresholded on the device (a bool is a quarter of a float32 to bring back), all fetched at once.
        return jax.device_get((self._upsample(low_res, return_logits), scores, low_res))

    def _predict_pi(self, boxes: np.ndarray, return_logits: bool):
        boxes = transforms.apply_boxes(self._check_boxes(boxes), self.original_size, self.image_size)[None]
        self.pi_base = self._pi_base(self._params, self.features, jnp.asarray(boxes))
        masks, low_res = jax.device_get((self._refine_to_original(None, return_logits), self.pi_base.low_res))
        scores = np.full(masks.shape[:2], np.nan, np.float32)  # Pi-SAM has no mask-quality head
        return masks, scores, low_res

    def refine(self, clicks, return_logits: bool = False) -> np.ndarray:
        """Corrects the masks of the last ``predict`` / ``predict_batch`` with clicks (Pi-SAM models).

        clicks: ``[(x, y, is_foreground), ...]`` in original-image pixels for the last box, or one such
        list per box after ``predict_batch`` (lists may differ in length: they are padded and masked).
        The interactor always starts from the box's features: pass every click so far, not only the new one.
        Returns masks (1, H, W) for one box, (P, 1, H, W) for P boxes; bool, or logits with ``return_logits``.
        """
        if not self.is_pi or not self.model.config.interactor:
            raise PromptError("refine needs a Pi-SAM model with its interactor (a stage-2 checkpoint)")
        if self.pi_base is None:
            raise RuntimeError("refine corrects a prediction: call predict(box=...) first")
        boxes = self.pi_base.low_res.shape[0]
        per_box = [clicks] if boxes == 1 and (not clicks or not isinstance(clicks[0][0], (list, tuple))) else clicks
        if len(per_box) != boxes:
            raise PromptError(f"give one list of clicks per box: {boxes} boxes, {len(per_box)} lists")
        clicks_in = self._click_arrays(per_box) if any(len(c) for c in per_box) else None
        masks = jax.device_get(self._refine_to_original(clicks_in, return_logits))
        return masks[0] if boxes == 1 and per_box is not clicks else masks

    def _click_arrays(self, per_box) -> tuple[np.ndarray, np.ndarray]:
        """Clicks -> model frame, (x, y) normalised with pixel centres (D3), padded to a multiple of 10
        with label -1 so that a new click rarely costs a compilation."""
        h, w = self.original_size
        longest = max(len(c) for c in per_box)
        n = 10 * -(-longest // 10)
        points = np.full((len(per_box), n, 2), 0.5, np.float32)
        labels = np.full((len(per_box), n), -1, np.int32)
        for i, box_clicks in enumerate(per_box):
            for j, click in enumerate(box_clicks):
                if len(click) != 3:
                    raise PromptError(f"a click is (x, y, is_foreground), got {click!r}")
                x, y, foreground = click
                if not (0 <= x < w and 0 <= y < h):
                    raise PromptError(f"click ({x:g}, {y:g}) lies outside the {w}x{h} image")
                points[i, j] = (x + 0.5, y + 0.5)
                labels[i, j] = int(bool(foreground))
        scale = np.array(self.input_size[::-1], np.float32) / np.array([w, h], np.float32)
        valid = labels >= 0
        points[valid] = points[valid] * scale / self.image_size
        return points, labels

    def _refine_to_original(self, clicks, return_logits: bool) -> jax.Array:
        return self._upsample(self._pi_refine(self._params, self.features, self.pi_base, clicks), return_logits)

    def _upsample(self, logits: jax.Array, return_logits: bool) -> jax.Array:
        """(..., h, w) logits in the padded model frame -> (..., H, W) at the original image size: the logits, or
        the masks (logits > 0) unless ``return_logits``."""
        return self._to_original(logits, input_size=self.input_size, original_size=self.original_size,
                                 size=self.image_size, logits=bool(return_logits))

    @staticmethod
    def _check_points(coords, labels) -> tuple[np.ndarray, np.ndarray]:
        coords, labels = np.asarray(coords, np.float32), np.asarray(labels)
        if coords.ndim != 3 or coords.shape[2] != 2 or labels.shape != coords.shape[:2]:
            raise PromptError(f"points must be (N, 2) with labels (N,), got {coords.shape[1:]} and {labels.shape[1:]}")
        if not np.isin(labels, (-1, 0, 1)).all():
            raise PromptError(f"point labels must be 1 (foreground), 0 (background) or -1 (ignore), got {labels}")
        return coords, labels.astype(np.int32)

    def _check_boxes(self, boxes: np.ndarray) -> np.ndarray:
        boxes = np.asarray(boxes, np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise PromptError(f"boxes must be (P, 4) as x0 y0 x1 y1, got {boxes.shape}")
        h, w = self.original_size
        for x0, y0, x1, y1 in boxes:
            if problem := transforms.box_problem((x0, y0, x1, y1), w, h):
                raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) {problem}")
        return boxes

    def _check_masks(self, masks) -> np.ndarray:
        masks = np.asarray(masks, np.float32)
        grid = 4 * self.model.config.embedding_size
        if masks.ndim != 4 or masks.shape[1:] != (1, grid, grid):
            raise PromptError(f"mask_input must be (1, {grid}, {grid}) low-res logits, got {masks.shape[1:]}")
        return masks


def _check_image(image) -> np.ndarray:
    """An (H, W, 3) uint8 image as is, or a float one as float32 with every value in 0..255."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise PromptError(f"set_image expects an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise PromptError(f"set_image expects uint8 or float pixels (0..255), got {image.dtype}")
    image = image.astype(np.float32, copy=False)
    lo, hi = float(image.min()), float(image.max())
    if not (0.0 <= lo and hi <= 255.0):  # also catches NaN
        raise PromptError(f"a float image must hold values in 0..255, got {lo:g}..{hi:g}")
    return image


def _to_original(low_res, *, input_size, original_size, size, logits: bool):
    """``transforms.postprocess_masks``, then the masks (logits > 0) unless ``logits``."""
    masks = transforms.postprocess_masks(low_res, input_size, original_size, size)
    return masks if logits else masks > 0.0


def _decode(merged, params, features, points, boxes, masks, *, multimask_output, hq_token_only):
    """Prompt encoder + mask decoder for the prompts of one image: scores (P, C), low-res logits (P, C, h, w).

    The image axis is dropped inside the jit: indexing its outputs outside costs an op dispatch each.
    """
    low_res, scores = merged(params).decode(
        features, points=points, boxes=boxes, masks=masks,
        multimask_output=multimask_output, hq_token_only=hq_token_only,
    )  # fmt: skip
    return scores[0], low_res[0]
