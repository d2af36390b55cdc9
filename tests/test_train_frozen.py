"""No gradient of a frozen parameter is computed, on the real model (issue 13 item 8).

For the jitted train step of each stage (Pi-SAM stage 1 and 2, HQ-SAM, SAM fine-tuning its mask decoder), built
as the loop builds it (``loop.loss_fn_of``, ``step.make_train_step`` on the tiny model), the step's jaxpr is
compared with the smallest backward pass that the trainable parameters need, derived independently from the
forward pass:

  * a value needs a tangent if it depends, differentiably, on a trainable parameter (forward taint; stop_gradient,
    rounding and integer values cut it);
  * an op's cotangent is needed if the loss depends differentiably on its output (backward relevance);
  * so a matmul or convolution of the forward pass needs one transposed matmul/convolution in the backward pass for
    each operand that carries a tangent, if its output matters to the loss, and none otherwise.

The backward pass (the equations JAX emits under ``transpose``) must hold exactly that many matmuls and
convolutions at every source line. Computing the gradient of a frozen weight (SAM's transformer, say) adds a
transposed op at that layer's line (``x^T dy``); differentiating the image encoder adds two per encoder layer; so
either fails the comparison (``test_the_check_sees_differentiated_frozen_modules`` plants both). The frozen
encoder runs outside the step: no equation of the step reads an image-encoder parameter. A ``custom_vjp`` op
(the deformable convolution) has a hand-written backward pass: it is only checked that no frozen parameter
enters it.

That frozen parameters are bit-identical after real steps is checked by the end-to-end runs of train.py
(test_train_loop.py: the export against the model the run started from, every stage).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import source_info_util  # the user source line of an equation (no public API)
from jax.extend import core as jcore

from configs import tiny
from pisam_jax.models import ModelConfig, build_model
from pisam_jax.training import loop, stages, trainable
from pisam_jax.training import step as step_lib

HEAVY = ("dot_general", "conv_general_dilated")
NO_DERIVATIVE = {"stop_gradient", "floor", "ceil", "round", "sign", "is_finite"}
CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call"}
LAYOUT = {"reshape", "transpose", "convert_element_type", "squeeze", "expand_dims", "broadcast_in_dim", "copy",
          "copy_p"}


def location(eqn) -> str:
    return source_info_util.summarize(eqn.source_info)


def _differentiable(v) -> bool:
    return isinstance(v, jcore.Var) and jnp.issubdtype(v.aval.dtype, jnp.inexact)


def _sub_jaxpr(eqn) -> jcore.Jaxpr:
    sub = eqn.params.get("jaxpr") or eqn.params.get("call_jaxpr")
    return sub.jaxpr if hasattr(sub, "jaxpr") else sub


class MinimalBackward:
    """The backward pass a forward jaxpr needs: transposed heavy ops per (primitive, source line).

    ``tangent[i]``: whether jaxpr input i is differentiated (a trainable parameter); ``frozen[i]``: whether it
    is a frozen parameter. ``needed`` counts the transposes; ``opaque`` holds the source lines of custom_vjp
    calls (their backward pass is their own); ``frozen_into_custom`` names custom_vjp calls a frozen parameter
    enters (their backward pass would compute its gradient).
    """

    def __init__(self, jaxpr: jcore.Jaxpr, tangent: list[bool], frozen: list[bool]):
        self.needed: collections.Counter = collections.Counter()
        self.opaque: set[str] = set()
        self.frozen_into_custom: list[str] = []
        out_needed = [i == 0 for i in range(len(jaxpr.outvars))]  # the loss; not the metrics
        self._backward(jaxpr, tangent, frozen, out_needed, self.needed)

    # -- forward: which values carry a tangent (and which are views of a frozen parameter)

    def _forward(self, jaxpr, tangent, frozen):
        t, f = {}, {}
        for v, a, b in zip(jaxpr.invars, tangent, frozen):
            t[v], f[v] = a and _differentiable(v), b
        get_t = lambda v: isinstance(v, jcore.Var) and t.get(v, False)  # noqa: E731
        get_f = lambda v: isinstance(v, jcore.Var) and f.get(v, False)  # noqa: E731
        for e in jaxpr.eqns:
            ins, name = [get_t(v) for v in e.invars], e.primitive.name
            fr = [False] * len(e.outvars)
            if name in CALLS:
                sub = _sub_jaxpr(e)
                k = len(e.invars) - len(sub.invars)
                outs, fr = self._forward(sub, ins[k:], [get_f(v) for v in e.invars[k:]])[2:]
            elif name == "scan":
                outs = self._scan_forward(e, ins)
            elif name == "cond":
                outs = [any(x) for x in zip(*(self._forward(b.jaxpr, ins[1:], [False] * len(ins[1:]))[2]
                                               for b in e.params["branches"]))]
            elif name == "while" and not any(ins):
                outs = [False] * len(e.outvars)
            elif list(jcore.jaxprs_in_params(e.params)) and name != "custom_vjp_call":
                raise NotImplementedError(f"no rule for {name} at {location(e)}")
            else:  # custom_vjp_call and plain primitives: any tangent in, tangents out
                outs = [any(ins) and name not in NO_DERIVATIVE] * len(e.outvars)
                if name in LAYOUT:
                    fr = [get_f(e.invars[0])]
            for v, a, b in zip(e.outvars, outs, fr):
                t[v], f[v] = a and _differentiable(v), b
        return t, f, [get_t(v) for v in jaxpr.outvars], [get_f(v) for v in jaxpr.outvars]

    def _scan_forward(self, e, ins):
        body, nc, nk = e.params["jaxpr"].jaxpr, e.params["num_consts"], e.params["num_carry"]
        carry = ins[nc:nc + nk]
        while True:
            outs = self._forward(body, ins[:nc] + carry + ins[nc + nk:], [False] * len(ins))[2]
            new = [a or b for a, b in zip(carry, outs[:nk])]
            if new == carry:
                return carry + outs[nk:]
            carry = new

    # -- backward: which values the loss's gradient needs; count the transposes

    def _backward(self, jaxpr, tangent, frozen, out_needed, counter) -> list[bool]:
        t, f = self._forward(jaxpr, tangent, frozen)[:2]
        get_t = lambda v: isinstance(v, jcore.Var) and t.get(v, False)  # noqa: E731
        need = {v: n for v, n in zip(jaxpr.outvars, out_needed) if isinstance(v, jcore.Var) and n}
        for e in reversed(jaxpr.eqns):
            outs = [need.get(v, False) for v in e.outvars]
            ins, name = [get_t(v) for v in e.invars], e.primitive.name
            if not any(outs) or not any(ins):
                continue
            if name in CALLS:
                sub = _sub_jaxpr(e)
                k = len(e.invars) - len(sub.invars)
                frz = [isinstance(v, jcore.Var) and f.get(v, False) for v in e.invars[k:]]
                in_need = [False] * k + self._backward(sub, ins[k:], frz, outs, counter)
            elif name == "scan":
                in_need = self._scan_backward(e, ins, outs, counter)
            elif name == "cond":
                per = [self._backward(b.jaxpr, ins[1:], [False] * len(ins[1:]), outs, counter)
                       for b in e.params["branches"]]
                in_need = [False] + [any(x) for x in zip(*per)]
            elif name == "custom_vjp_call":
                self.opaque.add(location(e))
                if any(isinstance(v, jcore.Var) and f.get(v, False) for v in e.invars):
                    self.frozen_into_custom.append(location(e))
                in_need = ins
            elif name in NO_DERIVATIVE:
                in_need = [False] * len(ins)
            else:
                in_need = ins
                if name in HEAVY:
                    counter[(name, location(e))] += sum(ins[:2])
            for v, n in zip(e.invars, in_need):
                if n and isinstance(v, jcore.Var) and _differentiable(v):
                    need[v] = True
        return [need.get(v, False) for v in jaxpr.invars]

    def _scan_backward(self, e, ins, outs, counter):
        body, nc, nk = e.params["jaxpr"].jaxpr, e.params["num_consts"], e.params["num_carry"]
        carry_t = self._scan_forward(e, ins)[:nk]
        body_in = ins[:nc] + carry_t + ins[nc + nk:]
        carry = outs[:nk]
        while True:
            in_need = self._backward(body, body_in, [False] * len(ins), carry + outs[nk:], collections.Counter())
            new = [a or b for a, b in zip(carry, in_need[nc:nc + nk])]
            if new == carry:
                break
            carry = new
        return self._backward(body, body_in, [False] * len(ins), carry + outs[nk:], counter)


def heavy_ops(jaxpr: jcore.Jaxpr, counts=None, transposed=False) -> collections.Counter:
    """(part, primitive, source line) -> count of the step's matmuls and convolutions; part is "bwd" under
    ``transpose`` (the backward pass) and "fwd" otherwise."""
    counts = collections.Counter() if counts is None else counts
    for e in jaxpr.eqns:
        tr = transposed or "transpose" in str(e.source_info.name_stack)
        if e.primitive.name in HEAVY:
            counts[("bwd" if tr else "fwd", e.primitive.name, location(e))] += 1
        for sub in jcore.jaxprs_in_params(e.params):
            heavy_ops(sub, counts, tr)
    return counts


def reads(jaxpr: jcore.Jaxpr) -> set:
    """The variables any equation of ``jaxpr`` (or of its sub-jaxprs, through their inputs) reads."""
    out = set()
    for e in jaxpr.eqns:
        out.update(v for v in e.invars if isinstance(v, jcore.Var))
    out.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
    return out


# -- the steps ----------------------------------------------------------------------------------


def tiny_config(name: str):
    c = tiny.get_config("stage1")
    c.stage = name
    if name == "sam":  # fine-tuning a converted SAM; two click rounds and a mask round keep the trace short
        c.train_modules = "mask_decoder"
        c.sam.click_rounds, c.sam.mask_rounds = 2, 1
    return c


@functools.lru_cache(maxsize=None)
def traced(name: str, train_modules: str | None = None):
    """The stage's train step on the tiny model (abstract weights: nothing is computed), as the loop builds it.

    -> dict(stage, paths (trainable, frozen), step jaxpr (the jitted step's body), forward jaxpr of the loss,
    number of trainable leaves).
    """
    config = tiny_config(name)
    if train_modules is not None:
        config.train_modules = train_modules
    stage = stages.get(config)
    cfg = ModelConfig.preset("vit_b", decoder=stage.decoder, interactor=stage.interactor,
                             **loop.model_overrides(config))
    model = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, train_state, frozen_state = nnx.split(model, stage.trainable(), ...)
    tx = step_lib.make_optimizer(steps_per_epoch=4, num_epochs=2)
    opt_state = jax.eval_shape(tx.init, train_state)
    mesh = step_lib.make_data_mesh()

    b, s = config.batch_size, cfg.image_size
    host = dict(image=np.zeros((b, s, s, 3), np.float32), mask=np.zeros((b, s, s), np.float32),
                box=np.tile(np.array([[10, 20, 100, 120]], np.float32), (b, 1)), has_object=np.ones((b,), bool),
                input_size=np.full((b, 2), s, np.int32))
    batch = step_lib.shard_batch(host, mesh)
    if not loop.encoder_trains(train_state):  # the loop's frozen encoder: its outputs come with the batch
        emb, interm0 = jax.eval_shape(loop.make_encode(graphdef, mesh), train_state, frozen_state, batch["image"])
        batch.update(embeddings=jnp.zeros(emb.shape, emb.dtype), interm0=jnp.zeros(interm0.shape, interm0.dtype))
    stage.setup(graphdef, mesh)
    if isinstance(stage, stages.STAGES["stage2"]):  # the frozen base forward, abstractly: zeros of its shapes
        shapes = jax.eval_shape(stage._base, train_state, frozen_state, batch)
        stage._base = lambda *_: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    batch, _ = stage.prepare(train_state, frozen_state, batch, 0)

    loss_fn = loop.loss_fn_of(stage)
    train_step = step_lib.make_train_step(graphdef, loss_fn, tx, mesh=mesh)
    key = jax.random.key(0)
    (outer,) = jax.make_jaxpr(train_step)(train_state, frozen_state, opt_state, batch, key).jaxpr.eqns
    step_jaxpr = outer.params["jaxpr"].jaxpr

    def forward(t, f, batch, key):
        return loss_fn(nnx.merge(graphdef, t, f), batch, key)

    fwd = jax.make_jaxpr(forward)(train_state, frozen_state, batch, key).jaxpr
    path = lambda p: ".".join(str(k) for k in p)  # noqa: E731
    paths = ([path(p) for p, _ in train_state.flat_state()], [path(p) for p, _ in frozen_state.flat_state()])
    return dict(stage=stage, paths=paths, step=step_jaxpr, forward=fwd, n_train=len(jax.tree.leaves(train_state)),
                n_frozen=len(jax.tree.leaves(frozen_state)), frozen_params=frozen_param_mask(frozen_state))


def frozen_param_mask(frozen_state) -> list[bool]:
    """Per frozen leaf: whether it is an ``nnx.Param`` (Buffers are constants, not parameters)."""
    return [isinstance(v, nnx.Param) for _, v in frozen_state.flat_state()]


def compare(t) -> tuple[MinimalBackward, dict, dict]:
    """-> (the minimal backward pass, {location: (needed, emitted)} where they differ, forward op counts)."""
    n_in = len(t["forward"].invars)
    tangent = [True] * t["n_train"] + [False] * (n_in - t["n_train"])
    frozen = [False] * t["n_train"] + t["frozen_params"] + [False] * (n_in - t["n_train"] - t["n_frozen"])
    minimal = MinimalBackward(t["forward"], tangent, frozen)
    ops = heavy_ops(t["step"])
    emitted = collections.Counter({k[1:]: v for k, v in ops.items() if k[0] == "bwd"})
    keys = {k for k in set(minimal.needed) | set(emitted) if k[1] not in minimal.opaque}
    diff = {k: (minimal.needed[k], emitted[k]) for k in sorted(keys) if minimal.needed[k] != emitted[k]}
    fwd_step = sum(v for k, v in ops.items() if k[0] == "fwd")
    fwd_loss = sum(v for k, v in heavy_ops(t["forward"]).items())
    return minimal, diff, dict(step=fwd_step, loss=fwd_loss, backward=sum(emitted.values()))


@pytest.mark.parametrize("name", ["stage1", "stage2", "hq", "sam"])
def test_no_gradient_of_a_frozen_parameter(name):
    t = traced(name)
    trains, frozen = t["paths"]
    # what trains is the stage's modules (SAM: the mask decoder); every other parameter is frozen state
    want = ("mask_decoder",) if name == "sam" else trainable.TRAINABLE[name]
    assert trains and all(any(p == m or p.startswith(m + ".") for m in want) for p in trains)
    assert not any(any(p == m or p.startswith(m + ".") for m in want) and is_param
                   for p, is_param in zip(frozen, t["frozen_params"]))
    # the frozen image encoder is not in the step: no equation reads any of its parameters
    step = t["step"]
    frozen_vars = step.invars[t["n_train"]:t["n_train"] + t["n_frozen"]]
    used = reads(step)
    encoder = [p for p, v in zip(frozen, frozen_vars) if p.startswith("image_encoder.") and v in used]
    assert not encoder and any(p.startswith("image_encoder.") for p in frozen)
    # the backward pass is the minimal one, line by line; nothing of the forward pass is recomputed
    minimal, diff, counts = compare(t)
    assert not diff, diff
    assert counts["step"] == counts["loss"], counts
    assert counts["backward"] > 0 and not minimal.frozen_into_custom, minimal.frozen_into_custom


def test_the_check_sees_differentiated_frozen_modules():
    """Plant the two mistakes the check exists for, on stage 1: SAM's two-way transformer differentiated
    (frozen in fact; only the HQ token's gradient must pass through it), and the image encoder trained inside the
    step. Each adds transposed ops that the stage-1 step does not need, among them at the planted module's lines
    (the encoder's tangents also reach SAM's transformer, so that one gains some too)."""
    real = traced("stage1")
    minimal = compare(real)[0]
    base = ",".join(trainable.TRAINABLE["stage1"])
    for extra, where in (("mask_decoder.transformer", "modeling/transformer.py"),
                         ("image_encoder", "modeling/image_encoder.py")):
        t = traced("stage1", f"{base},{extra}")
        emitted = collections.Counter({k[1:]: v for k, v in heavy_ops(t["step"]).items() if k[0] == "bwd"})
        extra_ops = {k: emitted[k] - minimal.needed[k] for k in emitted
                     if k[1] not in minimal.opaque and emitted[k] > minimal.needed[k]}
        # measured (tiny stage 1): 107 transposed ops needed (besides the deformable conv's own 6);
        # +35 with the transformer differentiated, +45 with the encoder
        assert any(where in k[1] for k in extra_ops), (extra, extra_ops)
