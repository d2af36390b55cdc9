"""The optimiser, the data-parallel mesh and a generic train step over split nnx state (PISAM_SPEC.md 5.2).

The step differentiates only with respect to the trainable state (``nnx.split`` by the filter of
``pisam_jax.training.trainable``): frozen parameters enter as constants, so no gradient of the backbone is ever
computed, while gradients still flow *through* frozen layers to trainable ones before them (the HQ token through
SAM's transformer). The optimiser state exists only for the trainable leaves, which is how the optimiser is masked.

Data parallel: one ``jax.jit`` over a ``("data",)`` mesh, the batch sharded on its leading axis
(``NamedSharding(mesh, P("data"))``), state and key replicated (``P()``); XLA inserts the gradient all-reduce.

    graphdef, train_state, frozen_state = nnx.split(model, trainable_filter(TRAINABLE["stage1"]), ...)
    tx = make_optimizer(num_epochs=100, steps_per_epoch=len(loader))
    opt_state = tx.init(train_state)
    mesh = make_data_mesh()
    train_step = make_train_step(graphdef, loss_fn, tx, mesh=mesh)
    train_state, frozen_state, opt_state = replicate((train_state, frozen_state, opt_state), mesh)
    for batch in loader:
        key, sub = jax.random.split(key)
        batch = shard_batch(batch, mesh)
        train_state, opt_state, metrics = train_step(train_state, frozen_state, opt_state, batch, sub)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

# loss_fn(model, batch, key) -> (scalar loss, {name: scalar}) ; the model is the merged nnx module.
LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
TrainStep = Callable[..., tuple[nnx.State, optax.OptState, dict[str, jax.Array]]]


# -- optimiser ----------------------------------------------------------------------------------


def cosine_epoch_schedule(base_lr: float, num_epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """torch ``CosineAnnealingLR(T_max=num_epochs, eta_min=0)`` stepped once per epoch, as an optax schedule.

    lr(step) = base_lr * (1 + cos(pi * e / num_epochs)) / 2 with e = step // steps_per_epoch: constant within
    an epoch, no warmup.
    """
    if num_epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"num_epochs and steps_per_epoch must be positive, got {num_epochs}, {steps_per_epoch}")

    def schedule(count):
        epoch = jnp.floor_divide(jnp.asarray(count, jnp.int32), steps_per_epoch).astype(jnp.float32)
        return base_lr * 0.5 * (1.0 + jnp.cos(math.pi * epoch / num_epochs))

    return schedule


def step_epoch_schedule(base_lr: float, drop_epoch: int, steps_per_epoch: int, gamma: float = 0.1) -> optax.Schedule:
    """torch ``StepLR(step_size=drop_epoch, gamma)`` stepped once per epoch (HQ-SAM's recipe: x0.1 at epoch 10)."""
    if drop_epoch <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"drop_epoch and steps_per_epoch must be positive, got {drop_epoch}, {steps_per_epoch}")

    def schedule(count):
        epoch = jnp.floor_divide(jnp.asarray(count, jnp.int32), steps_per_epoch)
        return base_lr * gamma ** jnp.floor_divide(epoch, drop_epoch).astype(jnp.float32)

    return schedule


def make_optimizer(
    *,
    steps_per_epoch: int,
    num_epochs: int = 100,
    learning_rate: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    lr_drop_epoch: int = 0,
) -> optax.GradientTransformation:
    """The reference's optimiser: Adam(1e-3, (0.9, 0.999), eps 1e-8, no weight decay), per-epoch cosine.

    ``lr_drop_epoch`` > 0 replaces the cosine by a x0.1 drop every that many epochs (HQ-SAM's recipe);
    ``warmup_steps`` > 0 multiplies the rate by a linear ramp from 1/warmup_steps to 1 over the first steps, and
    ``weight_decay`` > 0 makes it AdamW (decoupled decay): SAM's own recipe (SAM paper, appendix A) uses both.
    Initialise it on the trainable state only (``tx.init(train_state)`` or ``nnx.Optimizer(model, tx,
    wrt=trainable)``). The current learning rate is kept in ``opt_state.hyperparams["learning_rate"]``
    (``optax.inject_hyperparams``); the train step reports it.
    """
    if lr_drop_epoch > 0:
        base = step_epoch_schedule(learning_rate, lr_drop_epoch, steps_per_epoch)
    else:
        base = cosine_epoch_schedule(learning_rate, num_epochs, steps_per_epoch)
    schedule = base
    if warmup_steps > 0:
        schedule = lambda count: base(count) * jnp.minimum(1.0, (count + 1.0) / warmup_steps)  # noqa: E731
    if weight_decay > 0:
        return optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, b1=b1, b2=b2, eps=eps,
                                                     weight_decay=weight_decay)
    return optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=b1, b2=b2, eps=eps)


# -- mesh and placement -------------------------------------------------------------------------


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D ``("data",)`` mesh over the first ``num_devices`` devices (all of them by default, all hosts).

    Its axis is ``Auto`` (GSPMD propagation); ``jax.make_mesh`` would default to ``Explicit`` axes.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 0 < n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {n}")
    return jax.make_mesh(
        (n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
    )


def _check_mesh(mesh: jax.sharding.Mesh) -> None:
    if tuple(mesh.axis_names) != (DATA_AXIS,):
        raise ValueError(f"the train step wants a 1-D mesh with axis {DATA_AXIS!r}, got axes {mesh.axis_names}")
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        raise ValueError("the mesh has Explicit axes (jax.make_mesh's default); build it with make_data_mesh()")


def replicate(tree, mesh: jax.sharding.Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (``P()``).

    Multi-host: every process passes the same values. (``jax.device_put`` of a single-device ``jax.Array`` onto
    a multi-process sharding yields an array whose shards cannot be read back, jax 0.10.2: go through host memory.)
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def shard_batch(batch, mesh: jax.sharding.Mesh):
    """This host's batch (leaves with a leading batch axis) -> global arrays sharded over ``"data"``.

    Single host: the global batch. Multi-host: each host passes its own rows, in process order.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (one copy per row)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


# -- the step -----------------------------------------------------------------------------------


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh | None = None,
    donate: bool = True,
) -> TrainStep:
    """A jitted ``(train_state, frozen_state, opt_state, batch, key) -> (train_state, opt_state, metrics)``.

    graphdef, train_state, frozen_state: ``nnx.split(model, trainable, ...)``; opt_state: ``tx.init(train_state)``;
    batch: any pytree whose leaves have a leading (global) batch axis; key: a PRNG key for the loss.
    ``loss_fn(model, batch, key) -> (loss, metrics)`` runs on ``nnx.merge(graphdef, train_state, frozen_state)``.

    Only ``train_state`` is differentiated. ``metrics`` holds the loss function's metrics plus "loss",
    "grad_norm" (global L2 norm of the gradients, before the update) and, for ``make_optimizer``'s optimiser,
    "learning_rate" (the rate applied in this step).

    With ``mesh`` the batch is sharded over ``"data"`` and everything else replicated; the step is then the
    data-parallel step over the global batch. ``donate`` donates ``train_state`` and ``opt_state`` (they are
    replaced by the outputs; do not reuse the arguments).
    """

    def step(train_state, frozen_state, opt_state, batch, key):
        def objective(params):
            model = nnx.merge(graphdef, params, frozen_state)
            return loss_fn(model, batch, key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(train_state)
        updates, new_opt_state = tx.update(grads, opt_state, train_state)
        new_train_state = optax.apply_updates(train_state, updates)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        hyper = getattr(new_opt_state, "hyperparams", None)
        if isinstance(hyper, dict) and "learning_rate" in hyper:
            metrics["learning_rate"] = hyper["learning_rate"]
        return new_train_state, new_opt_state, metrics

    donate_argnums = (0, 2) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    _check_mesh(mesh)
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(DATA_AXIS))
    return jax.jit(
        step,
        in_shardings=(rep, rep, rep, data, rep),
        out_shardings=(rep, rep, rep),
        donate_argnums=donate_argnums,
    )


# -- health -------------------------------------------------------------------------------------


def all_finite(tree) -> jax.Array:
    """True when every floating leaf of ``tree`` is finite (jit-able)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_finite(metrics: dict[str, Any], step: int | None = None) -> dict[str, float]:
    """Fetch scalar metrics to the host; raise ``FloatingPointError`` naming any NaN/Inf. Returns them as floats."""
    values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
        where = "" if step is None else f" at step {step}"
        shown = ", ".join(f"{k}={values[k]}" for k in bad)
        raise FloatingPointError(
            f"non-finite training metrics{where}: {shown}; lower the learning rate or check the data"
        )
    return values
