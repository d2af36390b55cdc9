"""One model under the evaluation's geometry: GT box in, logits at the original resolution out.

    seg = BoxSegmenter.load("checkpoints/pisam_vit_h", geometry="stretch")
    seg.set_image(image)                          # (H, W, 3) uint8, original resolution
    out = seg.predict_box(seg.gt_box(gt))         # out.logits (H, W) float32; prediction = logits > 0
    logits = seg.refine(out, points, labels)      # clicks: (N, 2) (x, y) normalised with pixel centres

Geometry (PISAM_SPEC 7.2, D7):

* ``stretch`` (the paper's tables): the image is resized bilinearly to S x S (S = the
  model's input size, 1024 for the real models; aspect ratio not kept, nothing padded)
  in float and given to the predictor as float 0..255, not rounded (its longest-side
  resize is then the identity, and it normalises the float values); the box is the tight
  box of ``GT > 128`` of the GT stretched the same way, in float (pixel indices, no +1);
  the S x S mask logits are resized bilinearly (align_corners=False,
  ``transforms.resize_bilinear``) to the original H x W and thresholded at 0, as the
  reference's ``Runner.test``.
* ``longest_side`` (SAM's own): the predictor sees the original uint8 image (long side ->
  S with SAM's PIL resize, padded); the box is the tight box of ``GT > 128`` of the GT
  resized by the same filter in float, mapped back to original pixels for the
  predictor's API; the predictor returns logits at H x W.

Prompts (documented choices):

* SAM: ``multimask_output=False`` for the box prompt, as HQ-SAM's evaluation of SAM does
  (a single unambiguous box); refinement re-prompts with the box, the clicks as point
  prompts and the previous low-resolution logits as ``mask_input`` (PISAM_SPEC 6).
* HQ-SAM: the same, with ``hq_token_only`` as given (default False: the HQ mask corrects
  SAM's, ``segment_anything_hq``'s predictor default; HQ-SAM's own ``train.py``
  evaluation scores the HQ token's mask alone, which is ``hq_token_only=True``).
* Pi-SAM (decoder "pi"): ``predict(box=...)`` gives the 1024 head's mask;
  ``Predictor.refine(clicks)`` runs the Precise Interactor with all clicks in one pass.

Clicks enter as (x, y) normalised with pixel centres (``pisam_jax.data.clicks``, D3) and
are converted to the frame the predictor was given in SAM's pixel-index convention
(``col``, ``row``; the prompt encoder adds the half pixel), so a click lands on the
centre of the pixel it was drawn from in either geometry.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pisam_jax import transforms
from pisam_jax.data.pipeline import tight_box

GEOMETRIES = ("stretch", "longest_side")


@dataclasses.dataclass
class BoxOutput:
    """A prediction: ``logits`` (H, W) float32 at the original resolution (mask = logits > 0), the
    predictor's low-res logits (1, 256, 256) for re-prompting, and the box in the predictor's frame (None for
    clicks alone)."""

    logits: np.ndarray
    low_res: np.ndarray
    box: np.ndarray | None

    @property
    def mask(self) -> np.ndarray:
        return self.logits > 0


class BoxSegmenter:
    """A ``Predictor`` plus the evaluation geometry; one image at a time."""

    def __init__(self, model, *, name: str | None = None, geometry: str = "stretch", hq_token_only: bool = False,
                 predictor=None):
        """``predictor``: an existing ``Predictor`` of ``model`` to share (its compiled functions), else a new one."""
        from pisam_jax.predictor import Predictor

        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}, not {geometry!r}")
        self.model = model
        self.decoder = model.config.decoder
        self.name = name or self.decoder
        self.geometry = geometry
        self.hq_token_only = bool(hq_token_only) and self.decoder == "hq"
        self.size = int(model.config.image_size)
        self.predictor = predictor if predictor is not None else Predictor(model)
        self.original_size: tuple[int, int] | None = None

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, dtype: str | None = None, **kw) -> "BoxSegmenter":
        """``dtype``: the compute dtype, "float32" (default) or "bfloat16" (``load_model``)."""
        from pisam_jax.models import load_model

        kw.setdefault("name", model_name(model_dir))
        return cls(load_model(model_dir, dtype=dtype), **kw)

    @property
    def is_pi(self) -> bool:
        return self.decoder == "pi"

    @property
    def settings(self) -> dict:
        """What determines the predictions (recorded beside them so a resume never mixes settings).

        ``float_resize``: the stretched image and the resized GT are not rounded (spec 7.2); predictions saved
        before that (which lack the key) are not resumed. ``dtype``: the compute dtype, recorded when it is not
        float32 (so float32 runs resume the records made before the key existed).
        """
        dtype = getattr(self.model, "compute_dtype", "float32")
        return dict(decoder=self.decoder, geometry=self.geometry, image_size=self.size,
                    hq_token_only=self.hq_token_only, multimask_output=False, float_resize=True,
                    **({} if dtype == "float32" else {"dtype": dtype}))

    # ------------------------------------------------------------------ image and box

    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` (H, W, 3) uint8 at its original resolution, in the chosen geometry
        (``stretch``: resized in float and encoded unrounded)."""
        self.original_size = tuple(image.shape[:2])
        if self.geometry == "stretch":
            image = transforms.resize_stretch(image, self.size)
        self.predictor.set_image(image)

    def gt_box(self, gt: np.ndarray) -> np.ndarray:
        """The tight box of ``GT > 128`` (``gt`` (H, W) 0..255) resized in float to the model frame, in the
        predictor's API frame (x0, y0, x1, y1).

        x1, y1 are the last foreground pixel (torchvision ``masks_to_boxes``), widened to at least
        one pixel so the box has an area; an empty GT gives the whole frame (as the eval pipeline).
        """
        h, w = gt.shape
        if self.geometry == "stretch":
            box, _ = tight_box(transforms.resize_stretch(gt, self.size))
            limit = (self.size, self.size)
        else:
            resized = transforms.resize_longest_side(np.asarray(gt, np.float32), self.size)
            box, _ = tight_box(resized)
            rh, rw = resized.shape
            box = box * np.array([w / rw, h / rh, w / rw, h / rh], np.float32)
            limit = (h, w)
        x0, y0, x1, y1 = (float(v) for v in box)
        x1 = max(x1, min(x0 + 1.0, limit[1]))
        y1 = max(y1, min(y0 + 1.0, limit[0]))
        return np.array([x0, y0, x1, y1], np.float32)

    def predict_box(self, box: np.ndarray) -> BoxOutput:
        kw = dict(multimask_output=False, return_logits=True)
        if self.decoder == "hq":
            kw["hq_token_only"] = self.hq_token_only
        masks, _, low_res = self.predictor.predict(box=box, **kw)
        return BoxOutput(self._to_original(masks), np.asarray(low_res)[:1], box)

    # ------------------------------------------------------------------ clicks

    def frame_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) normalised pixel-centre (x, y) -> pixel-index (x, y) in the predictor's frame."""
        fh, fw = (self.size, self.size) if self.geometry == "stretch" else self.original_size
        return (np.asarray(points, np.float64).reshape(-1, 2) * np.array([fw, fh]) - 0.5).astype(np.float32)

    def refine(self, initial: BoxOutput, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Logits (H, W) at the original resolution after the clicks ``points`` (N, 2) normalised
        (x, y), ``labels`` (N,) 1 foreground / 0 background, all in one pass from ``initial``."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        if len(labels) == 0:
            return initial.logits
        if self.is_pi:
            return self._pi_refine(self.frame_points(points), labels)
        return self.predict_points(points, labels, box=initial.box, mask_input=initial.low_res).logits

    def predict_points(self, points: np.ndarray, labels: np.ndarray, *, box: np.ndarray | None = None,
                       mask_input: np.ndarray | None = None) -> BoxOutput:
        """SAM / HQ-SAM: one prompt of clicks ``points`` (N, 2) normalised (x, y), ``labels`` (N,) 1 / 0, with a box
        (predictor frame) and a previous answer's low-res logits (1, 256, 256) where given.

        Clicks alone without previous logits are ambiguous: the model then gives its three masks and the best
        scored is kept (SAM's single-point evaluation); otherwise one mask, as for the box.
        """
        ambiguous = box is None and mask_input is None
        kw = dict(multimask_output=ambiguous, return_logits=True)
        if self.decoder == "hq":
            kw["hq_token_only"] = self.hq_token_only
        masks, scores, low_res = self.predictor.predict(point_coords=self.frame_points(points),
                                                        point_labels=np.asarray(labels, np.int32).reshape(-1),
                                                        box=box, mask_input=mask_input, **kw)
        best = int(np.argmax(scores)) if ambiguous else 0
        return BoxOutput(self._to_original(masks[best:best + 1]), np.asarray(low_res)[best:best + 1], box)

    def _pi_refine(self, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Pi-SAM: every click in one pass through the interactor, from the last box's cached features.

        A click on the first row or column of an image larger than the frame lands in (-0.5, 0) in frame pixels
        (inside the frame's first pixel, left of its centre), which ``Predictor.refine`` refuses as outside; it
        is moved to that pixel's centre (less than half a frame pixel).
        """
        clicks = [(max(float(x), 0.0), max(float(y), 0.0), bool(lab)) for (x, y), lab in zip(coords, labels)]
        return self._to_original(self.predictor.refine(clicks, return_logits=True))

    # ------------------------------------------------------------------ geometry

    def _to_original(self, masks) -> np.ndarray:
        """The predictor's (1, h, w) logits in its frame -> (H, W) float32 logits at the original size."""
        m = np.asarray(masks, np.float32)
        m = m.reshape(m.shape[-2:])
        if m.shape != tuple(self.original_size):
            m = transforms.resize_bilinear(m, self.original_size)
        return m


def model_name(model_dir: str | os.PathLike) -> str:
    """A model's report name: its directory's base name, or its run's for a training export (RUN/export)."""
    path = os.path.normpath(os.fspath(model_dir))
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) or name if name == "export" else name
