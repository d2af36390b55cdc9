"""Segment one image with a box (and optional clicks) and write the mask.

    python predict.py --model checkpoints/sam_vit_b --image photo.jpg --box 100 80 620 540 \
        --point 300 200 1 --point 500 90 0 --out mask.png --overlay overlay.png

Points are X Y LABEL in image pixels, LABEL 1 = foreground, 0 = background (SAM, HQ-SAM).
Pi-SAM models take the box and correct its mask with clicks, X Y fg|bg in image pixels:

    python predict.py --model checkpoints/pisam_vit_h --image photo.jpg --box 100 80 620 540 \
        --click 300 200 fg --click 500 90 bg --out mask.png --overlay overlay.png

User errors (missing files, bad boxes) print one line and exit with status 2; no
output file is written unless the whole prediction succeeded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (python -m convert.sam|convert.hq_sam ... --out DIR)")
    p.add_argument("--image", required=True, help="input image (8/16-bit, gray, RGB or RGBA)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), required=True)
    p.add_argument("--point", type=float, nargs=3, action="append", default=[], metavar=("X", "Y", "LABEL"))
    p.add_argument("--click", nargs=3, action="append", default=[], metavar=("X", "Y", "fg|bg"),
                   help="Pi-SAM models: a correcting click (repeatable)")
    p.add_argument("--out", required=True, help="output mask (0/255 PNG)")
    p.add_argument("--overlay", help="optional picture of the mask, box and points over the image")
    p.add_argument("--multimask", action="store_true", help="predict 3 masks and keep the best-scored one")
    p.add_argument(
        "--hq-token-only", action="store_true", help="HQ-SAM models: the HQ token's mask alone, not added to SAM's"
    )
    return p.parse_args(argv)


def write_atomically(picture: Image.Image, path: str) -> None:
    """Saves next to ``path`` under a temporary name, then renames: no half-written file, ever."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        picture.save(tmp, format=IMAGE_SUFFIXES[target.suffix.lower()])
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def check_output(path: str, flag: str) -> None:
    target = Path(path)
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{flag} {path}: use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {target.parent} does not exist")


class UsageError(ValueError):
    pass


def run(args: argparse.Namespace) -> None:
    from pisam_jax.data.images import read_image
    from pisam_jax.models import load_model
    from pisam_jax.overlay import draw_overlay
    from pisam_jax.predictor import Predictor

    check_output(args.out, "--out")
    if args.overlay:
        check_output(args.overlay, "--overlay")
    if any(label not in (0, 1) for _, _, label in args.point):
        raise UsageError("--point X Y LABEL: LABEL must be 1 (foreground) or 0 (background)")
    clicks = [parse_click(c) for c in args.click]
    model = load_model(args.model)
    is_pi = model.config.decoder == "pi"
    if clicks and not is_pi:
        raise UsageError(f"--click needs a Pi-SAM model; {args.model} is {model.config.decoder!r} (use --point)")
    if args.point and is_pi:
        raise UsageError("a Pi-SAM model is prompted with --box and corrected with --click, not --point")
    image = read_image(args.image)
    box = np.array(args.box, np.float32)
    points = np.array([p[:2] for p in args.point] + [c[:2] for c in clicks], np.float32).reshape(-1, 2)
    labels = np.array([p[2] for p in args.point] + [int(c[2]) for c in clicks], np.int32)

    predictor = Predictor(model)
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(
        point_coords=points if len(points) and not is_pi else None,
        point_labels=labels if len(points) and not is_pi else None,
        box=box,
        multimask_output=args.multimask,
        hq_token_only=args.hq_token_only,
    )
    mask = masks[int(np.argmax(scores))] if not is_pi else masks[0]
    if clicks:
        mask = predictor.refine(clicks)[0]
    outputs = {args.out: Image.fromarray((mask * 255).astype(np.uint8))}
    if args.overlay:
        outputs[args.overlay] = draw_overlay(image, mask, box=box, points=points, labels=labels)
    for path, picture in outputs.items():
        write_atomically(picture, path)
    score = "" if is_pi else f" (score {scores.max():.3f})"
    print(f"wrote {args.out}" + (f" and {args.overlay}" if args.overlay else "") + score)


def parse_click(click: list[str]) -> tuple[float, float, bool]:
    x, y, kind = click
    if kind not in ("fg", "bg"):
        raise UsageError(f"--click X Y KIND: KIND must be fg or bg, got {kind!r}")
    try:
        return float(x), float(y), kind == "fg"
    except ValueError:
        raise UsageError(f"--click X Y KIND: X and Y must be numbers, got {x!r} {y!r}") from None


def main(argv=None) -> int:
    from pisam_jax.data.images import ImageReadError
    from pisam_jax.models import ModelError
    from pisam_jax.predictor import PromptError

    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, ImageReadError, ModelError, PromptError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
