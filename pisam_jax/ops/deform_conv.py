"""Modulated deformable convolution v2 (DCNv2) with ``torchvision.ops.deform_conv2d`` semantics, NHWC.

For output pixel (oy, ox), offset group g and kernel tap k = i * kw + j, the sample point is

    py = oy * stride - padding + i * dilation + offset[..., g, k, 0]      (dy first, as torchvision)
    px = ox * stride - padding + j * dilation + offset[..., g, k, 1]

The input is sampled bilinearly there (each of the 4 corners outside the image counts as zero), multiplied
by ``mask[..., g, k]`` and contracted with ``weight[i, j]``; contributions are summed over taps and channels.

How it is computed (the "gather kernel"), and why:
  * The input is zero-padded by one pixel, so the 4 bilinear corners of any sample are one 2x2xC window of it:
    one gather per sample fetches them as 2 contiguous runs of 2*C values, zero padding replaces per-corner
    bounds checks, and the gathered map (8.5 MB per image at 256x256x32) stays in cache. Packing the 4 corners
    into one (H+1)(W+1) x 4C table was slower on CPU: 4x the bytes to gather from and to build.
  * A ``lax.scan`` over the kh*kw taps samples one tap and accumulates ``columns @ weight[tap]`` on the matmul
    units, so memory stays at one tap's columns (B, Ho*Wo, 4, C), never all taps' (about 0.4 GB per image at
    7x7 on 256x256x32). Offsets and masks are sliced per tap inside the loop rather than transposed up front.
    That is the CPU's form. On an accelerator a step takes several taps at once (``taps_per_step``: as many as
    keep a step's gathered corners under ``STEP_BYTES``): each step is a handful of kernels whatever its size,
    so at batch 1 the 49 sequential steps of a 7x7 kernel cost more in launches than in work.
  * A ``custom_vjp`` recomputes the gather in the backward pass instead of keeping every tap's gathered corners
    as residuals (what autodiff of the scan stores: 1.6 GB per image at 7x7 on 256x256x32), gets the offset and
    mask gradients from the four products <d loss / d columns, corner q>, and scatter-adds the input gradient
    into a single padded accumulator carried through the scan.

torchvision returns 0 early when ``py <= -1 or py >= H or px <= -1 or px >= W``. With zero-padded corners that
value is already 0 (every corner with a non-zero bilinear weight is outside the image), and torchvision's backward
(``get_coordinate_weight``, ``deformable_col2im``) has no early exit, so the formulation here matches forward and
backward without special-casing it.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


# Accelerators: the most bytes of gathered corners one step of the tap loop may hold (``taps_per_step``).
STEP_BYTES = 512 * 2**20


class _Geometry(NamedTuple):
    """Static shape information of one call; hashable, so it can be a non-differentiable custom_vjp argument."""

    height: int
    width: int
    out_height: int
    out_width: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    taps_per_step: int  # taps sampled per step of the tap loop; divides kernel_h * kernel_w


def _pair(v, name: str) -> tuple[int, int]:
    """An int or an (h, w) pair of ints -> (h, w)."""
    try:
        pair = tuple(map(operator.index, v if isinstance(v, (tuple, list)) else (v, v)))
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return pair


def _default_taps_per_step(x: jax.Array, taps: int, pixels: int) -> int:
    """1 on the CPU paths; elsewhere the most taps (a divisor of ``taps``) whose corners fit ``STEP_BYTES``."""
    from pisam_jax.modeling import common

    if common.cpu_paths():
        return 1
    per_tap = x.shape[0] * pixels * 4 * x.shape[-1] * jnp.dtype(x.dtype).itemsize
    return max(t for t in range(1, taps + 1) if taps % t == 0 and (t == 1 or t * per_tap <= STEP_BYTES))


def _geometry(x, offset, mask, weight, bias, stride, padding, dilation, taps_per_step) -> _Geometry:
    """Validates shapes as torchvision does and returns the static geometry of the call."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"deform_conv2d: need stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}"
        )
    if x.ndim != 4 or offset.ndim != 4 or weight.ndim != 4:
        raise ValueError(
            "deform_conv2d: x (B,H,W,Cin), offset (B,Ho,Wo,2*G*kh*kw) and weight (kh,kw,Cin,Cout) must be 4-D; "
            f"got x {x.shape}, offset {offset.shape}, weight {weight.shape}"
        )
    batch, height, width, cin = x.shape
    kh, kw, w_cin, cout = weight.shape
    if w_cin != cin:
        raise ValueError(f"deform_conv2d: weight {weight.shape} expects {w_cin} input channels, x {x.shape} has {cin}")
    taps = kh * kw
    if offset.shape[-1] % (2 * taps) or offset.shape[-1] == 0:
        raise ValueError(
            f"deform_conv2d: offset channels ({offset.shape[-1]}) must be a positive multiple of "
            f"2*kh*kw = {2 * taps}"
        )
    groups = offset.shape[-1] // (2 * taps)
    if cin % groups:
        raise ValueError(f"deform_conv2d: input channels ({cin}) must be divisible by the {groups} offset groups")
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"deform_conv2d: the output would be empty ({out_h}x{out_w}) for x {x.shape}")
    if offset.shape[:3] != (batch, out_h, out_w):
        raise ValueError(
            f"deform_conv2d: offset {offset.shape} must be (B, Ho, Wo, C) = ({batch}, {out_h}, {out_w}, C) "
            f"for x {x.shape}"
        )
    if mask is not None and mask.shape != (batch, out_h, out_w, groups * taps):
        raise ValueError(
            f"deform_conv2d: mask {mask.shape} must be (B, Ho, Wo, G*kh*kw) = {(batch, out_h, out_w, groups * taps)}"
        )
    if bias is not None and bias.shape != (cout,):
        raise ValueError(f"deform_conv2d: bias {bias.shape} must be ({cout},)")
    if taps_per_step is None:
        taps_per_step = _default_taps_per_step(x, taps, out_h * out_w)
    if taps_per_step < 1 or taps % taps_per_step:
        raise ValueError(f"deform_conv2d: taps_per_step ({taps_per_step}) must divide the {taps} kernel taps")
    return _Geometry(height, width, out_h, out_w, kh, kw, stride, padding, dilation, groups, taps_per_step)


def _pad_groups(x: jax.Array, groups: int) -> jax.Array:
    """(B, H, W, G*Cg) -> (B*G, H+2, W+2, Cg), zero-padded by one pixel.

    The 2x2 cell whose top-left corner is (y0, x0), for y0 in [-1, H-1] and x0 in [-1, W-1], is the window
    [y0+1 : y0+3, x0+1 : x0+3] of the padded map; corners outside the image read the zero border.
    """
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups).transpose(0, 3, 1, 2, 4).reshape(b * groups, h, w, c // groups)
    return jnp.pad(xg, ((0, 0), (1, 1), (1, 1), (0, 0)))


class _Taps(NamedTuple):
    """Bilinear sampling of a step's taps: the 2x2 windows of the padded input and the per-corner factors.

    S = P * T samples: every output pixel's T taps of the step, pixel-major.
    """

    row: jax.Array  # (BG, S) int32 top row of the window in the padded input
    col: jax.Array  # (BG, S) int32 left column
    weight: jax.Array  # (BG, S, 4) bilinear weights of corners (0,0), (0,1), (1,0), (1,1); 0 without a corner inside
    d_dy: jax.Array  # (BG, S, 4) d weight / d py
    d_dx: jax.Array  # (BG, S, 4) d weight / d px


def _bilinear(geom: _Geometry, first_tap: jax.Array, off: jax.Array) -> _Taps:
    """The step's first tap index (scalar) and its taps' offsets (BG, P, T, 2) as (dy, dx) -> padded-input windows
    and bilinear factors of its S = P * T samples."""
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    pixel = jnp.arange(geom.out_height * geom.out_width)[:, None]
    tap = first_tap + jnp.arange(geom.taps_per_step)[None, :]
    base_y = (pixel // geom.out_width) * sh - ph + (tap // geom.kernel_w) * dh  # (P, T)
    base_x = (pixel % geom.out_width) * sw - pw + (tap % geom.kernel_w) * dw
    off = off.reshape(off.shape[0], -1, 2)
    base_y, base_x = base_y.reshape(-1), base_x.reshape(-1)
    # int + float in f32, the same rounding as torchvision's (out_y*stride - pad) + i*dil + offset.
    py = base_y.astype(jnp.float32) + off[..., 0].astype(jnp.float32)
    px = base_x.astype(jnp.float32) + off[..., 1].astype(jnp.float32)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    ly, lx = py - y0, px - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    # Cells with top-left corner in [-1, H-1] x [-1, W-1] touch the image; the others sample only zeros.
    valid = (y0 >= -1) & (y0 <= geom.height - 1) & (x0 >= -1) & (x0 <= geom.width - 1)
    valid = valid.astype(jnp.float32)[..., None]
    row = jnp.clip(y0 + 1, 0, geom.height).astype(jnp.int32)
    col = jnp.clip(x0 + 1, 0, geom.width).astype(jnp.int32)
    weight = jnp.stack([hy * hx, hy * lx, ly * hx, ly * lx], axis=-1) * valid
    d_dy = jnp.stack([-hx, -lx, hx, lx], axis=-1) * valid
    d_dx = jnp.stack([-hy, hy, -ly, ly], axis=-1) * valid
    return _Taps(row, col, weight, d_dy, d_dx)


# One 2x2xC window per sample: the 4 corners come from 2 contiguous runs of 2*C values of a map that stays in cache.
_WINDOW = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(), start_index_map=(0, 1))
_WINDOW_ADD = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(1, 2, 3), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1)
)


def _gather(xpad: jax.Array, t: _Taps) -> jax.Array:
    """xpad (BG, H+2, W+2, Cg) -> corners (BG, P, 4, Cg); window starts are already in range."""

    def one(table, row, col):
        start = jnp.stack([row, col], axis=-1)
        return jax.lax.gather(
            table, start, _WINDOW, (2, 2, table.shape[-1]), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
        )

    corners = jax.vmap(one)(xpad, t.row, t.col)  # (BG, P, 2, 2, Cg)
    return corners.reshape(*t.row.shape, 4, -1)


def _scatter_add(acc: jax.Array, t: _Taps, corners: jax.Array) -> jax.Array:
    """The transpose of ``_gather``: adds corners (BG, P, 4, Cg) into acc (BG, H+2, W+2, Cg)."""

    def one(table, row, col, upd):
        start = jnp.stack([row, col], axis=-1)
        return jax.lax.scatter_add(
            table, start, upd, _WINDOW_ADD, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS
        )

    return jax.vmap(one)(acc, t.row, t.col, corners.reshape(*t.row.shape, 2, 2, -1))


def _blend(weight: jax.Array, corners: jax.Array) -> jax.Array:
    """weight (..., 4), corners (..., 4, C) -> (..., C) in f32.

    Written as four elementwise products: XLA:CPU compiles both the equivalent einsum (a dot with batch
    dimensions) and a reduction over the corner axis into loops several times slower.
    """
    weight = weight.astype(jnp.float32)
    return sum(weight[..., q, None] * corners[..., q, :].astype(jnp.float32) for q in range(4))


def _dot4(a: jax.Array, b: jax.Array) -> jax.Array:
    """Sum over the last axis (4 corners) of a * b, unrolled for the same reason as ``_blend``."""
    return sum(a[..., q] * b[..., q] for q in range(4))


def _to_columns(s: jax.Array, batch: int) -> jax.Array:
    """(B*G, P, T, Cg) -> (B, P, T*G*Cg): tap-major columns, in which offset group g owns input channels
    [g*Cg, (g+1)*Cg), as in torchvision."""
    bg, p, t, cg = s.shape
    return s.reshape(batch, bg // batch, p, t, cg).transpose(0, 2, 3, 1, 4).reshape(batch, p, -1)


def _from_columns(c: jax.Array, groups: int, taps: int) -> jax.Array:
    """(B, P, T*G*Cg) -> (B*G, P, T, Cg), the inverse of ``_to_columns``."""
    b, p, n = c.shape
    return c.reshape(b, p, taps, groups, n // (taps * groups)).transpose(0, 3, 1, 2, 4).reshape(b * groups, p, taps, -1)


def _tap_slices(geom: _Geometry, first_tap, off, mask, weight):
    """Slices the step's T taps from ``first_tap`` out of off (B, P, G*K*2), mask (B, P, G*K), weight (K, Cin, Cout).

    Returns offsets (BG, P, T, 2), mask (BG, P, T) and the weight (T*Cin, Cout). Slicing inside the loop, instead
    of transposing to tap-major once, avoids writing a copy of the offsets (25 MB per image at 7x7); so does
    splitting the channels into (G, K) here rather than outside the loop, where XLA copied them into a new layout.
    """
    b, p = off.shape[:2]
    g, taps, t = geom.groups, geom.kernel_h * geom.kernel_w, geom.taps_per_step
    o = jax.lax.dynamic_slice_in_dim(off.reshape(b, p, g, taps, 2), first_tap, t, axis=3)
    m = jax.lax.dynamic_slice_in_dim(mask.reshape(b, p, g, taps), first_tap, t, axis=3)
    o = o.transpose(0, 2, 1, 3, 4).reshape(b * g, p, t, 2)
    m = m.transpose(0, 2, 1, 3).reshape(b * g, p, t)
    w = jax.lax.dynamic_slice_in_dim(weight, first_tap, t)
    return o, m, w.reshape(-1, w.shape[-1])


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _deform_core(geom: _Geometry, xpad, off, mask, weight):
    """xpad (BG, H+2, W+2, Cg); off (B, P, G*K*2); mask (B, P, G*K); weight (K, Cin, Cout) -> (B, P, Cout) f32."""
    return _deform_fwd(geom, xpad, off, mask, weight)[0]


def _first_taps(geom: _Geometry) -> jax.Array:
    """The first tap of each step of the tap loop."""
    return jnp.arange(0, geom.kernel_h * geom.kernel_w, geom.taps_per_step)


def _deform_fwd(geom, xpad, off, mask, weight):
    batch, pixels = off.shape[:2]
    bg, t = xpad.shape[0], geom.taps_per_step

    def step(acc, k):
        o, m, w = _tap_slices(geom, k, off, mask, weight)
        taps = _bilinear(geom, k, o)
        # Bilinear blend and modulation in f32; the matmul then runs in the input dtype with f32 accumulation.
        s = _blend(taps.weight * m.reshape(bg, -1)[..., None], _gather(xpad, taps))
        cols = _to_columns(s.reshape(bg, pixels, t, -1).astype(xpad.dtype), batch)
        return acc + jnp.einsum("bpi,io->bpo", cols, w, preferred_element_type=jnp.float32), None

    acc = jnp.zeros((batch, pixels, weight.shape[-1]), jnp.float32)
    out, _ = jax.lax.scan(step, acc, _first_taps(geom))
    return out, (xpad, off, mask, weight)


def _deform_bwd(geom, residuals, g_out):
    """Per tap: recompute the gather; one contraction of the corners with the column gradient gives the
    mask and offset gradients; the input gradient is scatter-added into one padded accumulator."""
    xpad, off, mask, weight = residuals
    batch, pixels = off.shape[:2]
    groups, bg, t = geom.groups, xpad.shape[0], geom.taps_per_step
    g_out = g_out.astype(jnp.float32)
    # g_out^T (Cout, B*P), transposed once: the weight gradient g_out^T @ columns is then a plain matmul, where
    # columns^T @ g_out made XLA transpose the columns on every tap.
    g_out_t = g_out.reshape(-1, g_out.shape[-1]).T

    def step(g_xpad, k):
        o, m, w = _tap_slices(geom, k, off, mask, weight)
        m = m.astype(jnp.float32).reshape(bg, -1)[..., None]  # (BG, S, 1)
        taps = _bilinear(geom, k, o)
        corners = _gather(xpad, taps)
        s = _blend(taps.weight * m, corners).reshape(bg, pixels, t, -1)
        cols = _to_columns(s, batch).reshape(batch * pixels, -1)
        g_w = (g_out_t @ cols).T  # (T*Cin, Cout)
        g_s = _from_columns(jnp.einsum("bpo,io->bpi", g_out, w.astype(jnp.float32)), groups, t)
        g_s = g_s.reshape(bg, pixels * t, -1)  # (BG, S, Cg)
        # <g_s, corner q> for each corner: every sampling gradient is a weighted sum of these four numbers.
        g_q = jnp.einsum("npc,npqc->npq", g_s, corners, preferred_element_type=jnp.float32)
        g_m = _dot4(taps.weight, g_q)
        g_o = m * jnp.stack([_dot4(taps.d_dy, g_q), _dot4(taps.d_dx, g_q)], axis=-1)
        g_xpad = _scatter_add(g_xpad, taps, (taps.weight * m)[..., None] * g_s[..., None, :])
        return g_xpad, (g_o.reshape(bg, pixels, t, 2), g_m.reshape(bg, pixels, t), g_w.reshape(t, -1, g_w.shape[-1]))

    g_xpad = jnp.zeros(xpad.shape, jnp.float32)
    g_xpad, (g_off, g_mask, g_weight) = jax.lax.scan(step, g_xpad, _first_taps(geom))
    # (steps, B*G, P, T, ...) -> the input layouts (B, P, G*K*...).
    g_off = g_off.reshape(-1, batch, groups, pixels, t, 2).transpose(1, 3, 2, 0, 4, 5).reshape(off.shape)
    g_mask = g_mask.reshape(-1, batch, groups, pixels, t).transpose(1, 3, 2, 0, 4).reshape(mask.shape)
    g_weight = g_weight.reshape(weight.shape)
    return g_xpad.astype(xpad.dtype), g_off.astype(off.dtype), g_mask.astype(mask.dtype), g_weight.astype(weight.dtype)


_deform_core.defvjp(_deform_fwd, _deform_bwd)


def deform_conv2d(
    x: jax.Array,
    offset: jax.Array,
    mask: jax.Array | None,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    taps_per_step: int | None = None,
) -> jax.Array:
    """``torchvision.ops.deform_conv2d`` (modulated when ``mask`` is given) on NHWC tensors.

    Args:
      x: (B, H, W, Cin).
      offset: (B, Ho, Wo, 2*G*kh*kw), channels ordered [group][tap = i*kw + j][dy, dx] as torchvision's;
        the number of offset groups G is offset channels // (2*kh*kw), and Cin must be divisible by it.
      mask: (B, Ho, Wo, G*kh*kw), channels [group][tap], or None (all ones: DCN v1).
      weight: (kh, kw, Cin, Cout), Flax HWIO (torch's (Cout, Cin, kh, kw) transposed by (2, 3, 1, 0)).
      bias: (Cout,) or None.
      stride, padding, dilation: ints or (h, w) pairs; Ho = (H + 2*pad - dil*(kh-1) - 1) // stride + 1.
      taps_per_step: kernel taps sampled together per step of the tap loop (a divisor of kh*kw); None: 1 on
        the CPU paths (``modeling.common.cpu_paths``), elsewhere as many as ``STEP_BYTES`` allows.

    Returns:
      (B, Ho, Wo, Cout) in the promoted dtype of x and weight; bf16 inputs accumulate in f32.

    Raises:
      ValueError: naming the mismatching shape or argument.
    """
    geom = _geometry(x, offset, mask, weight, bias, stride, padding, dilation, taps_per_step)
    batch, groups = x.shape[0], geom.groups
    taps, pixels = geom.kernel_h * geom.kernel_w, geom.out_height * geom.out_width
    dtype = jnp.result_type(x, weight)
    if mask is None:
        mask = jnp.ones((batch, geom.out_height, geom.out_width, groups * taps), offset.dtype)
    off = offset.reshape(batch, pixels, -1)
    mod = mask.reshape(batch, pixels, -1)
    xpad = _pad_groups(x.astype(dtype), groups)
    w = weight.astype(dtype).reshape(taps, x.shape[-1], -1)
    out = _deform_core(geom, xpad, off, mod, w)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.reshape(batch, geom.out_height, geom.out_width, -1).astype(dtype)
