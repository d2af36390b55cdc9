"""The generic train step: freezing by one filter, data parallel equals single device, per-epoch cosine Adam.

The model is a small stand-in with Pi-SAM's shape of the problem: a frozen ``backbone``, a trainable ``adapter``
whose output passes through a frozen ``neck`` (as the HQ token passes through SAM's frozen transformer), a
trainable ``head``, and a ``Buffer``.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pisam_jax.modeling.common import Buffer
from pisam_jax.training import losses, step, trainable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Dummy(nnx.Module):
    """(B, 16, 16, 3) image -> (B, 16, 16) logits."""

    def __init__(self, rngs: nnx.Rngs):
        self.backbone = nnx.List([nnx.Conv(3, 8, (3, 3), rngs=rngs), nnx.Conv(8, 8, (3, 3), rngs=rngs)])
        self.adapter = nnx.Conv(8, 8, (1, 1), rngs=rngs)
        self.neck = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.head = nnx.Conv(8, 1, (1, 1), rngs=rngs)
        self.scale = Buffer(jnp.full((), 2.0))

    def __call__(self, x):
        for conv in self.backbone:
            x = jax.nn.gelu(conv(x))
        x = jax.nn.gelu(self.adapter(x))
        return self.head(jax.nn.gelu(self.neck(x)))[..., 0] * self.scale[...]


TRAINABLE = nnx.All(nnx.Param, lambda path, _: path[0] in ("adapter", "head"))


def loss_fn(model, batch, key):
    logits = model(batch["image"])
    out = losses.mask_losses(key, logits, batch["mask"], num_points=64)
    return out["bce"] + out["dice"], out


def make_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 16, 16, 3)).astype(np.float32),
        "mask": (rng.random((n, 32, 32)) > 0.5).astype(np.float32),
    }


TRAINED_PATHS = {("adapter", "kernel"), ("adapter", "bias"), ("head", "kernel"), ("head", "bias")}


def run_steps(train_step, train_state, frozen_state, opt_state, batch, n=3):
    """``n`` steps -> (train_state, the last metrics)."""
    for i in range(n):
        train_state, opt_state, metrics = train_step(train_state, frozen_state, opt_state, batch, jax.random.key(i))
        step.check_finite(metrics, i)
    return train_state, metrics


def values(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """{path: a copy of the value} of every variable (Params and the Buffer)."""
    return {tuple(map(str, k)): np.array(v.get_value()) for k, v in nnx.state(model, nnx.Variable).flat_state()}


def changed_paths(before: dict, after: nnx.Module) -> set[tuple]:
    """Paths of the variables whose values differ from ``before`` (``values`` of the model before training)."""
    b = values(after)
    assert before.keys() == b.keys() and len(b) == 5 * 2 + 1  # 5 convs (kernel, bias), the Buffer
    return {k for k in b if not np.array_equal(before[k], b[k])}


def count_convs(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "conv_general_dilated"
        for sub in jax.core.jaxprs_in_params(eqn.params):
            n += count_convs(sub)
    return n


def test_only_trainable_params_are_differentiated_and_updated():
    model = Dummy(nnx.Rngs(0))
    initial = values(model)
    graphdef, train_state, frozen_state = nnx.split(model, TRAINABLE, ...)
    tx = step.make_optimizer(steps_per_epoch=2, num_epochs=3)
    opt_state = tx.init(train_state)
    train_step = step.make_train_step(graphdef, loss_fn, tx)  # donates, as in the loop
    batch = jax.tree.map(jnp.asarray, make_batch(4))

    # the optimiser state covers the trainable leaves only (Adam: mu and nu)
    n_train = len(jax.tree.leaves(train_state))
    assert n_train == 4
    assert len(jax.tree.leaves(opt_state.inner_state[0].mu)) == n_train

    # the step's jaxpr: 5 forward convs + the backward convs the trainable subset needs:
    # head kernel, head input, neck input (no neck kernel), adapter kernel (nothing in the backbone)
    jaxpr = jax.make_jaxpr(train_step)(train_state, frozen_state, opt_state, batch, jax.random.key(0)).jaxpr
    assert count_convs(jaxpr) == 5 + 4
    gd_all, params, buffers = nnx.split(model, nnx.Param, ...)
    everything = jax.make_jaxpr(
        jax.grad(lambda p: loss_fn(nnx.merge(gd_all, p, buffers), batch, jax.random.key(0))[0])
    )(params).jaxpr
    assert count_convs(everything) == 5 + 9  # what differentiating every parameter would cost

    train_state, metrics = run_steps(train_step, train_state, frozen_state, opt_state, batch)
    assert {"loss", "bce", "dice", "grad_norm", "learning_rate"} <= set(metrics)
    # The trained model, as the loop exports it: every parameter outside adapter/head and the Buffer keep their
    # values bit for bit, every adapter/head parameter moved (gradients reached the adapter through the frozen neck).
    assert changed_paths(initial, nnx.merge(graphdef, train_state, frozen_state)) == TRAINED_PATHS
    assert not any(x.is_deleted() for x in jax.tree.leaves(frozen_state))  # not donated: reusable every step

    # The check can fail: with a filter that wrongly also selects the backbone, the backbone moves.
    leaky = nnx.All(nnx.Param, lambda path, _: path[0] in ("adapter", "head", "backbone"))
    graphdef, t, f = nnx.split(Dummy(nnx.Rngs(0)), leaky, ...)
    t, _ = run_steps(step.make_train_step(graphdef, loss_fn, tx), t, f, tx.init(t), batch)
    moved = changed_paths(initial, nnx.merge(graphdef, t, f))
    assert moved - TRAINED_PATHS and all(p[0] == "backbone" for p in moved - TRAINED_PATHS)

    # the same filter drives nnx.Optimizer
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=TRAINABLE)
    assert len(jax.tree.leaves(opt.opt_state)) == 2 * n_train + 1


def test_stage_filters():
    stage1 = [m.split(".", 1)[1] for m in trainable.TRAINABLE["stage1"]]

    class Decoder(nnx.Module):
        def __init__(self, rngs):
            for name in stage1 + ["transformer", "output_upscaling", "iou_prediction_head"]:
                setattr(self, name, nnx.Linear(2, 3, rngs=rngs))
            self.interact_2 = nnx.Dict(
                token_embed=nnx.Linear(4, 4, rngs=rngs), img_pe=Buffer(jnp.zeros((2, 5, 5)))
            )

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.image_encoder = nnx.Linear(3, 3, rngs=rngs)
            self.prompt_encoder = nnx.Linear(3, 2, rngs=rngs)
            self.mask_decoder = Decoder(rngs)

    model = Model(nnx.Rngs(0))
    c1 = trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["stage1"]))
    assert set(c1) == set(trainable.TRAINABLE["stage1"]) | {"total"}
    assert c1["total"] == 9 * len(stage1)
    hq = trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["hq"]))
    assert set(hq) == set(trainable.TRAINABLE["hq"]) | {"total"} and set(hq) < set(c1)  # stage 1 includes HQ's
    c2 = trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["stage2"]))
    assert c2 == {"mask_decoder.interact_2": 20, "total": 20}  # the Buffer never trains
    sam = trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["sam"]), depth=1)
    assert sam["total"] == 12 + 8 + 9 * (len(stage1) + 3) + 20  # every Param, no Buffer
    # a path names a module, not a prefix of a name; applied to the decoder alone
    assert trainable.param_counts(model, trainable.trainable_filter(["mask_decoder.interact"]))["total"] == 0
    assert trainable.param_counts(model.mask_decoder, trainable.trainable_filter(["interact_2"]))["total"] == 20
    _, t, rest = nnx.split(model, trainable.trainable_filter(trainable.TRAINABLE["stage2"]), ...)
    assert len(jax.tree.leaves(t)) == 2 and len(jax.tree.leaves(rest)) == 2 + 2 + 2 * 13 + 1
    with pytest.raises(ValueError, match="module paths"):
        trainable.trainable_filter("mask_decoder")


def test_pi_sam_counts_match_spec():
    """Spec 3.3 (vit_b): stage 1 = 1,395,287 + rgb_embed 616 (D2), interact_2 = 167,104; shapes only."""
    from pisam_jax.models import ModelConfig, build_model

    model = nnx.eval_shape(lambda: build_model(ModelConfig(decoder="pi", interactor=True)))
    c1 = trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["stage1"]))
    assert c1["mask_decoder.rgb_embed"] == 616
    assert c1["total"] == 1_395_287 + 616
    assert c1["mask_decoder.compress_vit_feat"] == 820_000 and c1["mask_decoder.mask_aspp"] == 311_566
    assert trainable.param_counts(model, trainable.trainable_filter(trainable.TRAINABLE["stage2"]))["total"] == 167_104


def test_learning_rate_follows_per_epoch_cosine_and_adam_matches_torch():
    import torch

    lr0, epochs, spe = 1e-3, 4, 3
    sched = step.cosine_epoch_schedule(lr0, epochs, spe)
    want = [lr0 * (1 + math.cos(math.pi * (s // spe) / epochs)) / 2 for s in range(epochs * spe)]
    np.testing.assert_allclose([float(sched(s)) for s in range(epochs * spe)], want, rtol=1e-6)

    # torch: Adam + CosineAnnealingLR(T_max=epochs) stepped once per epoch, on the same gradients
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5,)).astype(np.float32)
    grads = rng.normal(size=(epochs * spe, 5)).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.Adam([tp], lr=lr0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=epochs)
    torch_lrs = []
    for s in range(epochs * spe):
        torch_lrs.append(topt.param_groups[0]["lr"])
        tp.grad = torch.from_numpy(grads[s])
        topt.step()
        if (s + 1) % spe == 0:
            tsched.step()

    tx = step.make_optimizer(learning_rate=lr0, num_epochs=epochs, steps_per_epoch=spe)
    params, state, lrs = jnp.asarray(p0), None, []
    state = tx.init(params)
    update = jax.jit(tx.update)
    for s in range(epochs * spe):
        upd, state = update(jnp.asarray(grads[s]), state, params)
        params = optax.apply_updates(params, upd)
        lrs.append(float(state.hyperparams["learning_rate"]))
    np.testing.assert_allclose(lrs, want, rtol=1e-6)
    np.testing.assert_allclose(torch_lrs, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params), tp.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_check_finite():
    assert step.check_finite({"loss": jnp.asarray(1.5)}) == {"loss": 1.5}
    with pytest.raises(FloatingPointError, match="grad_norm"):
        step.check_finite({"loss": jnp.asarray(1.0), "grad_norm": jnp.asarray(jnp.nan)}, step=7)
    assert bool(step.all_finite({"a": jnp.ones(3), "b": jnp.arange(2)}))
    assert not bool(step.all_finite({"a": jnp.asarray([1.0, jnp.inf])}))


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    jax.config.update("jax_default_matmul_precision", "highest")
    from pisam_jax.training import step
    from tests.test_train_step import Dummy, TRAINABLE, loss_fn, make_batch

    assert jax.device_count() == 8, jax.devices()

    def run(mesh):
        graphdef, t, f = nnx.split(Dummy(nnx.Rngs(0)), TRAINABLE, ...)
        tx = step.make_optimizer(steps_per_epoch=2, num_epochs=2)
        o = tx.init(t)
        train_step = step.make_train_step(graphdef, loss_fn, tx, mesh=mesh)
        if mesh is not None:
            t, f, o = step.replicate((t, f, o), mesh)
        history, shards = [], None
        for i in range(2):
            batch = make_batch(16, seed=i)
            if mesh is not None:
                batch = step.shard_batch(batch, mesh)
                shards = len(batch["image"].addressable_shards)
                shard_rows = batch["image"].addressable_shards[0].data.shape[0]
            t, o, m = train_step(t, f, o, batch, jax.random.key(i))
            history.append({k: float(v) for k, v in m.items()})
        out = {"history": history, "params": [np.asarray(x).tolist() for x in jax.tree.leaves(t)]}
        if mesh is not None:
            out.update(shards=shards, shard_rows=shard_rows,
                       replicated=all(x.sharding.is_fully_replicated for x in jax.tree.leaves(t)))
        return out

    single = run(None)
    sharded = run(step.make_data_mesh())
    try:
        step.make_train_step(None, loss_fn, None, mesh=jax.make_mesh((8,), ("data",)))
        explicit_rejected = False
    except ValueError:
        explicit_rejected = True
    print("RESULT" + json.dumps({"single": single, "sharded": sharded, "explicit_rejected": explicit_rejected}))
    """
)


def test_sharded_step_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    single, sharded = result["single"], result["sharded"]
    assert sharded["shards"] == 8 and sharded["shard_rows"] == 2 and sharded["replicated"]
    assert result["explicit_rejected"]
    for a, b in zip(single["history"], sharded["history"]):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(single["params"], sharded["params"]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
