"""Parity of ``pisam_jax.ops.deform_conv`` and ``DeformableConv2d`` with ``torchvision.ops.deform_conv2d``.

Forward and gradients (input, offset, mask, weight) at fp32, NCHW torch vs NHWC JAX, judged against torchvision's
own fp32 error, measured by running it in float64 (tests/parity.py). An output or gradient entry is a sum of many
terms of both signs (up to Cin*kh*kw for the forward, B*Ho*Wo for the weight gradient, differences of neighbouring
pixels for the offset gradient), so its fp32 error follows the large terms, not the entry: the float64 run measures
exactly that, for every output and gradient alike. Every test prints its errors (``-s``).

Measured (AMD EPYC; AVX-512, AVX2, SSE4.2 alike), from exact: forward up to 8.4e-6 (torchvision 8.7e-6), gradients
up to 7.0e-5 (7.0e-5); ours / torchvision at most 1.99 (the offset and mask gradients at sampling points on cell
borders).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

from pisam_jax.modeling.deformable_conv import DeformableConv2d
from pisam_jax.ops.deform_conv import deform_conv2d
from tests.parity import U, assert_as_accurate, assert_close, float64


def nchw_to_nhwc(a: torch.Tensor) -> np.ndarray:
    return a.detach().numpy().transpose(0, 2, 3, 1)


def oihw_to_hwio(w: torch.Tensor) -> np.ndarray:
    return w.detach().numpy().transpose(2, 3, 1, 0)


def out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def make_inputs(rng, batch, cin, cout, h, w, k, stride, padding, dilation, groups, offset_scale, border=False):
    """Random NCHW torch inputs. With ``border``, offsets are whole or half pixels that land samples exactly on
    pixel centres and cell borders, including exactly -1, H and W (torchvision's cut-off) and beyond."""
    ho, wo = out_size(h, k, stride, padding, dilation), out_size(w, k, stride, padding, dilation)
    x = rng.standard_normal((batch, cin, h, w))
    if border:
        offset = np.round(rng.uniform(-offset_scale, offset_scale, (batch, 2 * groups * k * k, ho, wo)) * 2) / 2
        # Tap 0 (dy channel 0, dx channel 1) of four output pixels lands exactly on py = -1, px = W, py = H, px = -1.
        base = lambda o: o * stride - padding
        offset[:, 0, 0, 0] = -1 - base(0)
        offset[:, 1, 0, 1] = w - base(1)
        offset[:, 0, 1, 0] = h - base(1)
        offset[:, 1, 1, 1] = -1 - base(1)
    else:
        offset = rng.standard_normal((batch, 2 * groups * k * k, ho, wo)) * offset_scale
    mask = rng.uniform(0, 2, (batch, groups * k * k, ho, wo))
    weight = rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)
    return [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (x, offset, mask, weight)]


def in_float64(*tensors):
    """float64 leaf copies (the fp32 values, exactly) that collect their own gradients."""
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


CASES = {
    # name: (batch, cin, cout, h, w, k, stride, padding, dilation, groups, offset_scale, border, use_mask)
    "k3_nonsquare_batch2": (2, 6, 5, 9, 13, 3, 1, 1, 1, 1, 1.5, False, True),
    "k3_large_offsets": (1, 4, 4, 8, 8, 3, 1, 1, 1, 1, 6.0, False, True),
    "k3_pixel_borders": (1, 4, 3, 7, 6, 3, 1, 1, 1, 1, 9.0, True, True),
    "k7_pad3": (1, 8, 8, 12, 10, 7, 1, 3, 1, 1, 2.0, False, True),
    "k7_pixel_borders": (1, 4, 4, 9, 9, 7, 1, 3, 1, 1, 12.0, True, True),
    "k1": (2, 4, 6, 6, 5, 1, 1, 0, 1, 1, 1.0, False, True),
    "stride2_pad2_dil2_groups2": (2, 6, 4, 11, 9, 3, 2, 2, 2, 2, 2.0, False, True),
    "stride2_k7_groups4": (1, 8, 4, 14, 12, 7, 2, 3, 1, 4, 3.0, False, True),
    "no_mask": (2, 4, 5, 8, 9, 3, 1, 1, 1, 1, 2.0, False, False),
    "no_mask_borders_groups2": (1, 4, 4, 6, 8, 3, 1, 0, 1, 2, 7.0, True, False),
}


@pytest.mark.parametrize("case", CASES.keys())
def test_op_matches_torchvision(case):
    compare_op(case)


@pytest.mark.parametrize("case,taps_per_step", [("k3_pixel_borders", 3), ("k3_pixel_borders", 9),
                                                ("stride2_pad2_dil2_groups2", 9), ("stride2_k7_groups4", 7),
                                                ("k7_pixel_borders", 49)])
def test_op_several_taps_per_step(case, taps_per_step):
    """The accelerators' tap loop: several taps sampled per step (all of them at 9 and 49)."""
    compare_op(case, taps_per_step)


def test_taps_per_step_must_divide_the_taps():
    x, offset, mask, weight = (np.zeros(s, np.float32) for s in ((1, 5, 5, 2), (1, 5, 5, 18), (1, 5, 5, 9), (3, 3, 2, 2)))
    with pytest.raises(ValueError, match="taps_per_step \\(4\\) must divide the 9 kernel taps"):
        deform_conv2d(x, offset, mask, weight, padding=1, taps_per_step=4)


def test_taps_per_step_by_code_path(monkeypatch):
    """CPU: one tap per step. Accelerators: as many taps as keep a step's corners within STEP_BYTES (here a 7x7
    kernel on a 256^2 x 32 fp32 map: 33.5 MB of corners a tap, so 7 taps of 49 per step), all of them when small."""
    from pisam_jax.modeling import common
    from pisam_jax.ops import deform_conv as op

    big, small = jnp.zeros((1, 256, 256, 32)), jnp.zeros((1, 64, 64, 32))
    assert op._default_taps_per_step(big, 49, 256 * 256) == 1
    monkeypatch.setattr(common, "CODE_PATHS", "accelerator")
    assert op._default_taps_per_step(big, 49, 256 * 256) == 7
    assert op._default_taps_per_step(small, 49, 64 * 64) == 49
    assert op._default_taps_per_step(big.astype(jnp.bfloat16), 9, 256 * 256) == 9


def compare_op(case: str, taps_per_step: int | None = None):
    batch, cin, cout, h, w, k, stride, padding, dilation, groups, scale, border, use_mask = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x, offset, mask, weight = make_inputs(rng, batch, cin, cout, h, w, k, stride, padding, dilation, groups, scale, border)
    bias = torch.tensor(rng.standard_normal(cout), dtype=torch.float32, requires_grad=True)
    cotangent = None
    runs = []  # (output, [grad x, offset, weight, bias, mask]) in fp32, then exact
    for args in ([x, offset, mask, weight, bias], in_float64(x, offset, mask, weight, bias)):
        t_x, t_offset, t_mask, t_weight, t_bias = args
        out = torchvision.ops.deform_conv2d(t_x, t_offset, t_weight, t_bias, (stride, stride), (padding, padding),
                                            (dilation, dilation), t_mask if use_mask else None)
        if cotangent is None:
            cotangent = rng.standard_normal(out.shape).astype(np.float32)
        out.backward(torch.from_numpy(cotangent).to(out.dtype))
        grads = [nchw_to_nhwc(t_x.grad), nchw_to_nhwc(t_offset.grad), oihw_to_hwio(t_weight.grad), t_bias.grad.numpy(),
                 nchw_to_nhwc(t_mask.grad) if use_mask else None]
        runs.append((nchw_to_nhwc(out), grads))
    (ref, ref_grads), (exact, exact_grads) = runs

    def f(x, offset, mask, weight, bias):
        return deform_conv2d(x, offset, mask if use_mask else None, weight, bias, stride=stride, padding=padding,
                             dilation=dilation, taps_per_step=taps_per_step)

    args = (nchw_to_nhwc(x), nchw_to_nhwc(offset), nchw_to_nhwc(mask), oihw_to_hwio(weight), bias.detach().numpy())
    out, vjp = jax.vjp(jax.jit(f), *args)
    g_x, g_offset, g_mask, g_weight, g_bias = vjp(jnp.asarray(cotangent.transpose(0, 2, 3, 1)))

    assert_as_accurate(f"{case} forward", out, ref, exact)
    ours_grads = dict(x=g_x, offset=g_offset, weight=g_weight, bias=g_bias, mask=g_mask)
    # The bias gradient is a sum of the cotangent over every output pixel: a few values, whose rounding floor is
    # that sum's, ~sqrt(n) roundings (n = B Ho Wo terms; torchvision and XLA accumulate them in different orders).
    pixels = out.shape[0] * out.shape[1] * out.shape[2]
    for i, name in enumerate(("x", "offset", "weight", "bias", "mask")):
        if name != "mask" or use_mask:
            assert_as_accurate(f"{case} grad {name}", ours_grads[name], ref_grads[i], exact_grads[i],
                               roundings=np.sqrt(pixels) if name == "bias" else 1.0)


def test_op_at_pisam_size_7x7():
    """The Object Embedder's 7x7 call on a (reduced, 64x64 instead of 256x256) 32-channel map, forward only."""
    rng = np.random.default_rng(7)
    x, offset, mask, weight = make_inputs(rng, 1, 32, 32, 64, 64, 7, 1, 3, 1, 1, 3.0)
    ref, exact = (nchw_to_nhwc(torchvision.ops.deform_conv2d(x, o, w, None, padding=(3, 3), mask=m))
                  for x, o, m, w in ((x, offset, mask, weight), in_float64(x, offset, mask, weight)))
    ours = jax.jit(lambda *a: deform_conv2d(*a, padding=3))(
        nchw_to_nhwc(x), nchw_to_nhwc(offset), nchw_to_nhwc(mask), oihw_to_hwio(weight)
    )
    assert_as_accurate("64x64x32 k7 forward", ours, ref, exact)


def test_vmap_and_grad_under_jit():
    """vmap over an extra leading axis: every slice as torchvision's; grad of a jitted loss of the vmapped op is
    torchvision's gradient of the same loss."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 6, 7, 4)).astype(np.float32)
    offset = (rng.standard_normal((3, 2, 6, 7, 18)) * 2).astype(np.float32)
    mask = rng.uniform(0, 1, (3, 2, 6, 7, 9)).astype(np.float32)
    weight = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    f = jax.jit(lambda x, o, m: deform_conv2d(x, o, m, weight, padding=1))
    batched = jax.jit(jax.vmap(f))(x, offset, mask)
    grads = jax.jit(jax.grad(lambda x, o, m: jnp.sum(jax.vmap(f)(x, o, m) ** 2), argnums=(0, 1, 2)))(x, offset, mask)

    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    w = torch.from_numpy(np.ascontiguousarray(weight.transpose(3, 2, 0, 1)))
    for i in range(3):
        runs = []  # (output, grads) in fp32, then exact
        for dtype in (torch.float32, torch.float64):
            tx, to, tm = (to_torch(a[i]).to(dtype).requires_grad_(True) for a in (x, offset, mask))
            out = torchvision.ops.deform_conv2d(tx, to, w.to(dtype), None, padding=(1, 1), mask=tm)
            (out**2).sum().backward()
            runs.append((nchw_to_nhwc(out), [nchw_to_nhwc(t.grad) for t in (tx, to, tm)]))
        (ref, ref_grads), (exact, exact_grads) = runs
        assert_as_accurate(f"vmap slice {i}", batched[i], ref, exact)
        for name, g, r, e in zip(("x", "offset", "mask"), grads, ref_grads, exact_grads):
            assert_as_accurate(f"vmap grad {name} slice {i}", g[i], r, e)


def test_bf16_accumulates_in_f32():
    rng = np.random.default_rng(2)
    x, offset, mask, weight = make_inputs(rng, 1, 16, 8, 10, 10, 3, 1, 1, 1, 1, 2.0)
    ref = nchw_to_nhwc(torchvision.ops.deform_conv2d(x, offset, weight, None, padding=(1, 1), mask=mask))
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    args = (nchw_to_nhwc(x), nchw_to_nhwc(offset), nchw_to_nhwc(mask), oihw_to_hwio(weight))
    out = jax.jit(lambda *a: deform_conv2d(*a, padding=1))(*map(bf16, args))
    assert out.dtype == jnp.bfloat16
    # bf16 keeps 8 bits: each input is rounded by up to u = 2^-9 relative. A term x * mask * w then carries up to 3u,
    # the blended sample a bit more (the offset's rounding moves it by u * |offset| px, here |offset| < 6), the
    # columns are rounded to bf16 once more (u) before the f32-accumulated matmul, and the output once (u): an
    # output is within ~6u of the sum of its terms' magnitudes S (torchvision with |x|, |w| and |mask|, which
    # bounds every term's size). Accumulating in bf16 instead would add up to 144 roundings, ~144u S.
    with torch.no_grad():
        size = nchw_to_nhwc(torchvision.ops.deform_conv2d(x.abs(), offset, weight.abs(), None, padding=(1, 1),
                                                          mask=mask.abs()))
    assert_close("bf16 forward", out.astype(jnp.float32), ref, rtol=0.0, atol=6 * 2.0**-9 * size)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 8, 8, 4), (1, 8, 8, 17), (1, 8, 8, 9), (3, 3, 4, 5)), "multiple of 2\\*kh\\*kw"),
        (((1, 8, 8, 4), (1, 8, 8, 18), (1, 8, 8, 8), (3, 3, 4, 5)), "mask"),
        (((1, 8, 8, 4), (1, 8, 8, 18), (1, 8, 8, 9), (3, 3, 3, 5)), "input channels"),
        (((1, 8, 8, 4), (1, 6, 6, 18), (1, 6, 6, 9), (3, 3, 4, 5)), "offset"),
        (((1, 8, 8, 4), (1, 8, 8, 54), (1, 8, 8, 27), (3, 3, 4, 5)), "divisible by the 3 offset groups"),
        (((8, 8, 4), (1, 8, 8, 18), (1, 8, 8, 9), (3, 3, 4, 5)), "4-D"),
    ],
)
def test_invalid_shapes_raise(shapes, message):
    x, offset, mask, weight = (jnp.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        deform_conv2d(x, offset, mask, weight, padding=1)


class TorchDeformableConv2d(torch.nn.Module):
    """The reference DeformableConv2d of PISAM_SPEC section 3.1."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, bias: bool):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.offset_conv = torch.nn.Conv2d(cin, 2 * k * k, k, stride, padding, bias=True)
        self.modulator_conv = torch.nn.Conv2d(cin, k * k, k, stride, padding, bias=True)
        for conv in (self.offset_conv, self.modulator_conv):
            torch.nn.init.constant_(conv.weight, 0.0)
            torch.nn.init.constant_(conv.bias, 0.0)
        self.regular_conv = torch.nn.Conv2d(cin, cout, k, stride, padding, bias=bias)

    def forward(self, x):
        offset = self.offset_conv(x)
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return torchvision.ops.deform_conv2d(
            x, offset, self.regular_conv.weight, self.regular_conv.bias, self.stride, self.padding, mask=mask
        )


def build_module(*args, **kwargs) -> DeformableConv2d:
    """Builds the module in one compiled program (eager init compiles every random op separately: much slower)."""
    return nnx.jit(lambda: DeformableConv2d(*args, **kwargs, rngs=nnx.Rngs(0)))()


def load_torch_weights(module: DeformableConv2d, state_dict: dict) -> None:
    """torch state_dict -> nnx: conv weights (O, I, kh, kw) transposed (2, 3, 1, 0) to HWIO."""
    for key, value in state_dict.items():
        name, kind = key.rsplit(".", 1)
        conv = getattr(module, name)
        if kind == "weight":
            conv.kernel[...] = jnp.asarray(value.numpy().transpose(2, 3, 1, 0))
        else:
            conv.bias[...] = jnp.asarray(value.numpy())


@pytest.mark.parametrize("k, stride, padding, use_bias", [(3, 1, 1, False), (7, 1, 3, False), (3, 2, 1, True)])
def test_module_matches_reference(k, stride, padding, use_bias):
    torch.manual_seed(k + stride)
    ref = TorchDeformableConv2d(6, 5, k, stride, padding, use_bias)
    with torch.no_grad():  # non-zero offsets and modulation, so the deformable path is exercised
        for conv in (ref.offset_conv, ref.modulator_conv):
            conv.weight.normal_(0.0, 0.3)
            conv.bias.normal_(0.0, 0.5)
    ours = build_module(6, 5, k, stride=stride, padding=padding, use_bias=use_bias)
    ours_keys = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    torch_keys = {key.replace("weight", "kernel") for key in ref.state_dict()}
    assert ours_keys == torch_keys
    load_torch_weights(ours, ref.state_dict())

    x = torch.randn(2, 6, 12, 11)
    with torch.no_grad():
        expected, exact = nchw_to_nhwc(ref(x)), nchw_to_nhwc(float64(ref)(x.double()))
    graphdef, state = nnx.split(ours)
    out = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, nchw_to_nhwc(x))
    assert_as_accurate(f"module k{k} s{stride} bias={use_bias}", out, expected, exact)


def test_module_starts_as_plain_conv():
    """Zero-initialised offset and modulator convs: offsets 0, modulation 2*sigmoid(0) = 1."""
    module = build_module(4, 3, 3, padding=1)
    x = np.random.default_rng(3).standard_normal((1, 9, 8, 4)).astype(np.float32)
    both = nnx.jit(lambda module, x: (module(x), module.regular_conv(x)))
    deformable, regular = both(module, x)
    # Both sum the same n = 4 * 9 products (with offsets 0 and modulation 1 exactly) in their own orders: each is
    # within (n - 1) U S of the exact sum, S the sum of the products' magnitudes (the conv of |x| with |w|).
    size = jax.lax.conv_general_dilated(np.abs(x), jnp.abs(module.regular_conv.kernel[...]), (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert_close("init == regular conv", deformable, regular, rtol=0.0, atol=2 * 35 * U * np.asarray(size))
