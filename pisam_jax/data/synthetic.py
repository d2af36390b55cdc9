"""Synthetic high-resolution thin-structure segmentation data, with exact masks.

Each sample is one object made of 1-3 thin, mesh-like or branching structures
(fences, wires, lattices, branches, text strokes, perforated plates with holes) over a
textured background (multi-scale noise, soft blobs, faint out-of-focus lines). Structures are rasterised without antialiasing into the mask and
the image is composited from it, so the mask is exact. Samples are deterministic in
(seed, index) and independent of ``n``, the order and the number of workers.

    python -m pisam_jax.data.synthetic --out DIR --n 100 --size 2048 --seed 0

writes ``DIR/im/<name>.jpg`` and ``DIR/gt/<name>.png`` (the DIS5K layout; use
``--out ROOT/DIS5K/DIS-TR`` to make ``ROOT`` a data root for ``DIS5K-TR``).
"""

from __future__ import annotations

import argparse
import os
import string
import sys

import cv2
import numpy as np

from pisam_jax import outputs

KINDS = ("fence", "wires", "lattice", "branches", "text", "holes")


def sample_name(seed: int, index: int) -> str:
    return f"synth_s{seed}_{index:06d}"


# ----------------------------------------------------------------------------- textures

def _noise(rng, h, w, cells, channels=3):
    """Smooth value noise: a coarse normal grid upsampled bicubically to (h, w)."""
    g = rng.normal(size=(max(2, h // cells + 2), max(2, w // cells + 2), channels)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, channels)


def _texture(rng, h, w, base, amp):
    """Colour ``base`` with a gradient and multi-scale noise of amplitude ``amp`` (float32)."""
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy) / max(h, w)
    tex = base[None, None, :] + (ramp[..., None] * rng.uniform(-60, 60, size=3)).astype(np.float32)
    for cells, a in ((max(h, w) // 8, 1.0), (16, 0.6), (4, 0.35), (1, 0.2)):
        tex += amp * a * _noise(rng, h, w, cells, 1 if rng.random() < 0.5 else 3)
    return tex


def _upsample_u8(small, h, w):
    return cv2.resize(np.clip(np.rint(small), 0, 255).astype(np.uint8), (w, h),
                      interpolation=cv2.INTER_LINEAR)


def _background(rng, h, w, scale):
    """Textured background, built at 1/4 resolution (cheap) and upsampled; uint8 (h, w, 3)."""
    h4, w4, s4 = max(8, h // 4), max(8, w // 4), scale / 4
    bg = _texture(rng, h4, w4, rng.uniform(30, 225, size=3).astype(np.float32), rng.uniform(10, 30))
    # Clutter: soft blobs (background, not in the mask).
    for _ in range(rng.integers(3, 9)):
        layer = np.zeros((h4, w4), np.uint8)
        c = (int(rng.integers(0, w4)), int(rng.integers(0, h4)))
        ax = (int(rng.integers(20, 300) * s4) + 1, int(rng.integers(20, 300) * s4) + 1)
        cv2.ellipse(layer, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        layer = cv2.GaussianBlur(layer, (0, 0), 8 * s4 + 0.5).astype(np.float32)[..., None] / 255
        bg = bg * (1 - 0.5 * layer) + 0.5 * layer * rng.uniform(0, 255, size=3).astype(np.float32)
    # Thin, low-contrast distractor lines (out of focus: drawn at 1/4 resolution).
    lines = np.zeros((h4, w4), np.uint8)
    for _ in range(rng.integers(0, 6)):
        p0, p1 = rng.uniform(0, 1, 2) * [w4, h4], rng.uniform(0, 1, 2) * [w4, h4]
        cv2.line(lines, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 255, 1, cv2.LINE_AA)
    a = lines.astype(np.float32)[..., None] / 255 * rng.uniform(0.1, 0.3)
    bg = bg * (1 - a) + a * rng.uniform(0, 255, size=3).astype(np.float32)
    return _upsample_u8(bg, h, w)


# --------------------------------------------------------------------------- structures

def _region(rng, h, w):
    """A random convex quadrilateral covering a good part of the image, as a 0/255 mask."""
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    rx, ry = rng.uniform(0.2, 0.45) * w, rng.uniform(0.2, 0.45) * h
    angs = np.array([0.8, 2.4, 3.9, 5.5]) + rng.uniform(-0.35, 0.35, 4) + rng.uniform(0, np.pi / 2)
    pts = np.stack([cx + rx * np.cos(angs), cy + ry * np.sin(angs)], 1).astype(np.int32)
    m = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(m, pts, 255)
    return m, pts


def _grid_lines(m, rng, angle, spacing, thick, h, w):
    d = np.array([np.cos(angle), np.sin(angle)])
    n = np.array([-d[1], d[0]])
    diag = float(np.hypot(h, w))
    off = rng.uniform(0, spacing)
    for t in np.arange(-diag + off, diag, spacing):
        p = np.array([w / 2, h / 2]) + n * t
        a, b = p - d * diag, p + d * diag
        cv2.line(m, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 255, thick, cv2.LINE_8)


def _fence(rng, h, w, s):
    region, pts = _region(rng, h, w)
    lines = np.zeros((h, w), np.uint8)
    base = rng.uniform(0, np.pi)
    angles = [base, base + rng.choice([np.pi / 2, np.pi / 3])]
    if rng.random() < 0.5:  # chain-link: two diagonals
        angles = [base + np.pi / 4, base - np.pi / 4]
    for a in angles:
        _grid_lines(lines, rng, a, rng.uniform(25, 90) * s, max(1, int(rng.integers(2, 7) * s)), h, w)
    m = lines & region
    cv2.polylines(m, [pts], True, 255, max(2, int(rng.integers(6, 16) * s)), cv2.LINE_8)  # frame
    return m


def _lattice(rng, h, w, s):
    m = np.zeros((h, w), np.uint8)
    c = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
    r = int(rng.uniform(0.15, 0.4) * min(h, w))
    region = np.zeros((h, w), np.uint8)
    cv2.circle(region, c, r, 255, -1)
    base, sp, th = rng.uniform(0, np.pi), rng.uniform(20, 60) * s, max(1, int(rng.integers(1, 5) * s))
    for k in range(3):  # triangular / hexagonal-looking mesh
        _grid_lines(m, rng, base + k * np.pi / 3, sp, th, h, w)
    m &= region
    cv2.circle(m, c, r, 255, max(2, int(rng.integers(4, 12) * s)), cv2.LINE_8)
    return m


def _bezier(p0, p1, p2, p3, n=200):
    t = np.linspace(0, 1, n)[:, None]
    return ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3)


def _wires(rng, h, w, s):
    m = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 7)):
        side = rng.integers(0, 2)
        p0 = np.array([0, rng.uniform(0, h)]) if side else np.array([rng.uniform(0, w), 0])
        p3 = np.array([w, rng.uniform(0, h)]) if side else np.array([rng.uniform(0, w), h])
        p1, p2 = rng.uniform(0, 1, 2) * [w, h], rng.uniform(0, 1, 2) * [w, h]
        curve = _bezier(p0, p1, p2, p3).astype(np.int32)
        cv2.polylines(m, [curve], False, 255, max(1, int(rng.integers(1, 4) * s)), cv2.LINE_8)
    return m


def _branches(rng, h, w, s):
    m = np.zeros((h, w), np.uint8)
    stack = [(np.array([rng.uniform(0.3, 0.7) * w, h * rng.uniform(0.85, 1.0)]),
              -np.pi / 2 + rng.uniform(-0.3, 0.3), rng.uniform(0.15, 0.25) * h, rng.uniform(10, 20) * s, 0)]
    depth_max = int(rng.integers(6, 9))
    while stack:
        p, ang, length, thick, depth = stack.pop()
        q = p + length * np.array([np.cos(ang), np.sin(ang)])
        cv2.line(m, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 255, max(1, int(thick)), cv2.LINE_8)
        if depth < depth_max and length > 6:
            for _ in range(rng.integers(2, 4)):
                stack.append((q, ang + rng.uniform(-0.8, 0.8), length * rng.uniform(0.55, 0.8),
                              thick * 0.68, depth + 1))
    return m


def _text(rng, h, w, s):
    m = np.zeros((h, w), np.uint8)
    fonts = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
             cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX)
    for _ in range(rng.integers(1, 5)):
        txt = "".join(rng.choice(list(string.ascii_letters + string.digits), rng.integers(3, 10)))
        scale = rng.uniform(2, 7) * s
        org = (int(rng.uniform(0, 0.5) * w), int(rng.uniform(0.15, 0.95) * h))
        cv2.putText(m, txt, org, int(rng.choice(fonts)), scale, 255,
                    max(1, int(rng.integers(1, 8) * s)), cv2.LINE_8)
    return m


def _holes(rng, h, w, s):
    m = np.zeros((h, w), np.uint8)
    c = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
    ax = (int(rng.uniform(0.15, 0.4) * w), int(rng.uniform(0.15, 0.4) * h))
    cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    sp = rng.uniform(20, 70) * s
    r = max(1, int(sp * rng.uniform(0.2, 0.42)))
    ox, oy = rng.uniform(0, sp, 2)
    for y in np.arange(oy, h, sp):
        for x in np.arange(ox + (sp / 2 if rng.random() < 0.5 else 0), w, sp):
            cv2.circle(m, (int(x), int(y)), r, 0, -1, cv2.LINE_8)
    return m


_DRAW = {"fence": _fence, "wires": _wires, "lattice": _lattice, "branches": _branches,
         "text": _text, "holes": _holes}


# ------------------------------------------------------------------------------ samples

def generate_sample(seed: int, index: int, size: int = 2048, kinds=KINDS, detail: float = 1.0):
    """One sample: (image uint8 (H, W, 3) RGB, mask uint8 (H, W) in {0, 255}, kinds used).

    The long side is ``size``; the short side is size times one of 1, 3/4, 2/3 or 9/16. Structure widths and
    spacings scale with the image (a 512 px image is a 2048 px one shrunk 4x) times ``detail``: ``detail=4``
    draws a 512 px image with the widths, in pixels, of a 2048 px one (thicker relative to the image).
    """
    rng = np.random.default_rng([seed, index, size])
    long_, short = size, int(round(size * rng.choice([1.0, 0.75, 2 / 3, 0.5625])))
    h, w = (long_, short) if rng.random() < 0.5 else (short, long_)
    s = size / 2048.0 * detail
    chosen = list(rng.choice(list(kinds), size=min(len(kinds), int(rng.integers(1, 4))), replace=False))
    mask = np.zeros((h, w), np.uint8)
    for k in chosen:
        mask |= _DRAW[k](rng, h, w, s)
    if not mask.any():  # cannot happen with the drawers above; keep the guarantee explicit
        cv2.line(mask, (0, h // 2), (w - 1, h // 2), 255, 3)
    img = _background(rng, h, w, s)
    fg_base = rng.uniform(0, 255, size=3).astype(np.float32)
    bg_mean = img[::16, ::16].reshape(-1, 3).mean(0)
    if np.abs(fg_base - bg_mean).mean() < 50:  # keep the object visible
        fg_base = np.where(bg_mean > 127, bg_mean - 90, bg_mean + 90).astype(np.float32)
    fg = _upsample_u8(_texture(rng, max(8, h // 4), max(8, w // 4), fg_base, rng.uniform(5, 20)), h, w)
    cv2.copyTo(fg, mask, img)  # img[mask > 0] = fg[mask > 0]
    return img, mask, chosen


def encode_sample(seed: int, index: int, size: int = 2048, quality: int = 95,
                  detail: float = 1.0) -> tuple[str, bytes, bytes]:
    """Sample ``index`` as its files hold it: (name, JPEG image bytes, PNG mask bytes)."""
    img, mask, _ = generate_sample(seed, index, size, detail=detail)
    name = sample_name(seed, index)
    # 4:4:4 chroma: the default 4:2:0 subsampling smears thin coloured structures.
    ok1, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [
        cv2.IMWRITE_JPEG_QUALITY, quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    ok2, png = cv2.imencode(".png", mask)
    if not (ok1 and ok2):
        raise RuntimeError(f"encoding sample {name} failed")
    return name, jpg.tobytes(), png.tobytes()


def write_sample(out: str, seed: int, index: int, size: int = 2048, quality: int = 95, detail: float = 1.0) -> str:
    """Generate sample ``index`` and write it to ``out/im/<name>.jpg`` and ``out/gt/<name>.png``."""
    name, jpg, png = encode_sample(seed, index, size, quality, detail)
    outputs.write_files({os.path.join(out, "gt", name + ".png"): png,
                         os.path.join(out, "im", name + ".jpg"): jpg})
    return name


def _write_one(args):
    return write_sample(*args)


def generate(out: str, n: int, size: int = 2048, seed: int = 0, workers: int = 0,
             progress: bool = True, detail: float = 1.0) -> list[str]:
    """Write samples 0..n-1 for ``seed`` under ``out`` (DIS5K layout); returns their names."""
    os.makedirs(os.path.join(out, "im"), exist_ok=True)
    os.makedirs(os.path.join(out, "gt"), exist_ok=True)
    jobs = [(out, seed, i, size, 95, detail) for i in range(n)]
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"synthetic {size}px -> {out}", unit="img", disable=not progress)
    names = []
    if workers > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # "spawn", not fork: the caller may have started JAX, whose threads a fork would deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            for name in ex.map(_write_one, jobs):
                names.append(name)
                bar.update()
    else:
        for j in jobs:
            names.append(_write_one(j))
            bar.update()
    bar.close()
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pisam_jax.data.synthetic",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder; im/ and gt/ are created in it")
    p.add_argument("--n", type=int, default=100, help="number of samples")
    p.add_argument("--size", type=int, default=2048, help="long side in pixels")
    p.add_argument("--detail", type=float, default=1.0,
                   help="structure widths and spacings relative to the image (4: a 512 px image drawn with a 2048 px "
                        "one's widths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="worker processes (0 = in process)")
    a = p.parse_args(argv)
    if a.n < 0 or a.size < 64 or a.detail <= 0:
        p.error("--n must be >= 0, --size >= 64 and --detail > 0")
    try:
        generate(a.out, a.n, a.size, a.seed, a.workers, detail=a.detail)
    except OSError as e:
        print(f"error: cannot write to {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except outputs.OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
