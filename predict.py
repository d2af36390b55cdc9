"""Segment one image with a box (and optional clicks) and write the mask.

    python predict.py --model checkpoints/sam_vit_b --image photo.jpg --box 100 80 620 540 \
        --point 300 200 1 --point 500 90 0 --out mask.png --overlay overlay.png

Points are X Y LABEL in image pixels, LABEL 1 = foreground, 0 = background (SAM, HQ-SAM).
Pi-SAM models take the box and correct its mask with clicks, X Y fg|bg in image pixels:

    python predict.py --model checkpoints/pisam_vit_h --image photo.jpg --box 100 80 620 540 \
        --click 300 200 fg --click 500 90 bg --out mask.png --overlay overlay.png

User errors (missing files, bad boxes, points outside the image, an output that exists: pass
--overwrite to replace it) print one line and exit with status 2, before any model is loaded;
no output file is written unless the whole prediction succeeded, and then all are.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def parse_args(argv=None) -> argparse.Namespace:
    from pisam_jax.cli import ArgumentParser

    p = ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory (python -m convert.sam|convert.hq_sam|convert.pisam ... --out DIR)")
    p.add_argument("--image", required=True, help="input image (8/16-bit, gray, RGB or RGBA)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), required=True)
    p.add_argument("--point", type=float, nargs=3, action="append", default=[], metavar=("X", "Y", "LABEL"))
    p.add_argument("--click", nargs=3, action="append", default=[], metavar=("X", "Y", "fg|bg"),
                   help="Pi-SAM models: a correcting click (repeatable)")
    p.add_argument("--out", required=True, help="output mask (0/255 PNG)")
    p.add_argument("--overlay", help="optional picture of the mask, box and points over the image")
    p.add_argument("--overwrite", action="store_true", help="replace --out / --overlay files that exist")
    p.add_argument("--multimask", action="store_true", help="predict 3 masks and keep the best-scored one")
    p.add_argument(
        "--hq-token-only", "--hq_token_only", action="store_true",
        help="HQ-SAM models: the HQ token's mask alone, not added to SAM's",
    )
    return p.parse_args(argv)


def write_outputs(pictures: dict[str, Image.Image]) -> None:
    """Encodes every picture, then writes them all or none (``outputs.write_files``: temporaries, then renames)."""
    from pisam_jax.outputs import write_files

    encoded = {}
    for path, picture in pictures.items():
        buf = io.BytesIO()
        picture.save(buf, format=IMAGE_SUFFIXES[Path(path).suffix.lower()])
        encoded[path] = buf.getvalue()
    write_files(encoded)


def check_output(path: str, flag: str, overwrite: bool) -> None:
    from pisam_jax.outputs import OutputError, check_parent

    target = Path(path)
    if target.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{flag} {path}: use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {target.parent} does not exist")
    if os.path.lexists(target) and not overwrite:
        raise UsageError(f"{flag} {path} already exists; choose another name, or pass --overwrite to replace it")
    try:
        check_parent(target, flag)
    except OutputError as e:
        raise UsageError(str(e)) from None


class UsageError(ValueError):
    pass


def check_prompts(args: argparse.Namespace, clicks, height: int, width: int) -> None:
    """Box, points and clicks against the image (before any model is loaded)."""
    from pisam_jax.transforms import box_problem

    if problem := box_problem(args.box, width, height):
        raise UsageError("--box " + " ".join(f"{v:g}" for v in args.box) + f" {problem}")
    for flag, (x, y) in [("--point", p[:2]) for p in args.point] + [("--click", c[:2]) for c in clicks]:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise UsageError(f"{flag} {x:g} {y:g}: X and Y must be finite numbers")
        if not (0 <= x < width and 0 <= y < height):
            raise UsageError(f"{flag} {x:g} {y:g} lies outside the {width}x{height} image "
                             f"(x in [0, {width}), y in [0, {height}))")


def check_model_kind(args: argparse.Namespace, clicks, config) -> None:
    """The prompts the model takes (config.json only: before its parameters are loaded)."""
    is_pi = config.decoder == "pi"
    if clicks and not is_pi:
        raise UsageError(f"--click needs a Pi-SAM model; {args.model} is {config.decoder!r} (use --point)")
    if clicks and not config.interactor:
        raise UsageError(f"--click needs a Pi-SAM model with the Precise Interactor (stage 2); {args.model} is a "
                         "stage-1 model")
    if args.point and is_pi:
        raise UsageError("a Pi-SAM model is prompted with --box and corrected with --click, not --point")
    if args.hq_token_only and config.decoder != "hq":
        raise UsageError(f"--hq-token-only needs an HQ-SAM model; {args.model} is {config.decoder!r}")


def run(args: argparse.Namespace) -> None:
    from pisam_jax.data.images import read_image
    from pisam_jax.models import load_model, read_config
    from pisam_jax.overlay import draw_overlay
    from pisam_jax.predictor import Predictor

    # Every check before the model loads: a mistake costs a second, not a model load and an encoder run.
    if any(label not in (0, 1) for _, _, label in args.point):
        raise UsageError("--point X Y LABEL: LABEL must be 1 (foreground) or 0 (background)")
    clicks = [parse_click(c) for c in args.click]
    image = read_image(args.image)
    check_prompts(args, clicks, *image.shape[:2])
    config = read_config(args.model)
    check_model_kind(args, clicks, config)
    check_output(args.out, "--out", args.overwrite)
    if args.overlay:
        check_output(args.overlay, "--overlay", args.overwrite)
        if Path(args.overlay).absolute() == Path(args.out).absolute():
            raise UsageError("--overlay and --out name the same file; give two names")
    if Path(args.image).absolute() in (Path(args.out).absolute(), Path(args.overlay or args.out).absolute()):
        raise UsageError("--out / --overlay name the input --image; give another name")

    model = load_model(args.model)
    is_pi = config.decoder == "pi"
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
    pictures = {args.out: Image.fromarray((mask * 255).astype(np.uint8))}
    if args.overlay:
        pictures[args.overlay] = draw_overlay(image, mask, box=box, points=points, labels=labels)
    write_outputs(pictures)
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
    from pisam_jax.outputs import OutputError
    from pisam_jax.predictor import PromptError

    args = parse_args(argv)
    try:
        run(args)
    except (UsageError, ImageReadError, ModelError, PromptError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
