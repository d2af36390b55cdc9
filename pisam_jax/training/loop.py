"""The training loop: runs any stage of ``training.stages`` (SAM, HQ-SAM, Pi-SAM stage 1 and 2) the same way.

One step:

  * the data: a batch of augmented images, masks and tight boxes (``data.pipeline``), this host's rows;
  * when the stage does not train the image encoder, its outputs (embeddings, the first global block) are
    computed outside the gradient by a jitted forward of their own, or taken from the embedding cache;
  * ``stage.prepare``: the stage's host-side work (Pi-SAM stage 2: the frozen base forward and the clicks);
  * the jitted train step differentiates ``stage.loss`` with respect to the trainable state only
    (``stage.trainable()``), so no gradient of a frozen parameter is ever computed.

Data parallel over a ``("data",)`` mesh of all devices (all hosts): ``batch_size`` is global, each host reads
its rows of each global batch (``batch_size / process_count`` of them, ``data.pipeline``), so any number of hosts
trains on the batches of one. Everything random is a function of
(seed, step): the loss and prompts (``fold_in(key, step)``), the stage-2 clicks (numpy, per global row) and the
data (grain, whose iterator state is checkpointed), so a resumed run repeats an uninterrupted one exactly.

Every ``log_images_every`` steps, ``training.samples`` predicts a fixed set of training images with the current
parameters (its own jitted forward, outside the train step) and writes image | ground truth | prediction panels
to TensorBoard; it reads no training data and draws no training randomness, so it does not change the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pisam_jax import models
from pisam_jax.data import datasets as datasets_lib
from pisam_jax.data import pipeline
from pisam_jax.models import ModelConfig
from pisam_jax.training import checkpoints as ckpt_lib
from pisam_jax.training import logging as log_lib
from pisam_jax.training import samples, stages, trainable, workdirs
from pisam_jax.training import step as step_lib
from pisam_jax.training.stages import Stage

EXPORT_DIR = "export"


class UsageError(ValueError):
    """A configuration or input the user must fix; the entry point prints it in one line, exit status 2."""


class Diverged(RuntimeError):
    """A non-finite loss or parameter; the run stops and keeps its last good checkpoint."""


# -- configuration -----------------------------------------------------------------------------------


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    d = dict(config.model.to_dict())
    d.pop("model_type", None)
    for k, v in d.items():
        if isinstance(v, list):
            d[k] = tuple(v)
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"model_type", "decoder", "interactor", "provenance"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UsageError(f"config.model: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return d


def check_config(config: ml_collections.ConfigDict) -> None:
    try:
        stages.stage_name(config.stage)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if config.batch_size <= 0:
        raise UsageError(f"config.batch_size must be positive, got {config.batch_size}")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if config.batch_size % n_dev:
        raise UsageError(f"config.batch_size {config.batch_size} is not a multiple of the {n_dev} devices")
    if config.batch_size % n_proc:
        raise UsageError(f"config.batch_size {config.batch_size} is not a multiple of the {n_proc} processes")
    if config.cache_embeddings and config.data.augment:
        raise UsageError(
            "config.cache_embeddings needs config.data.augment=False: with augmentation every epoch sees "
            "different pixels, so an image's embedding cannot be reused"
        )
    if config.num_epochs <= 0:
        raise UsageError(f"config.num_epochs must be positive, got {config.num_epochs}")
    if config.log_images_every < 0:
        raise UsageError(f"config.log_images_every must be >= 0 (0: no sample images), got {config.log_images_every}")
    if config.log_images_every and config.log_images_count <= 0:
        raise UsageError(f"config.log_images_count must be positive, got {config.log_images_count}")
    if config.log_images_every and not 16 <= config.log_images_size <= 1024:
        raise UsageError(f"config.log_images_size must be in [16, 1024] px, got {config.log_images_size}")
    try:
        models.check_dtype(config.get("dtype", None))
    except models.ModelError as e:
        raise UsageError(f"config.dtype: {e}") from None
    model_overrides(config)


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# -- data ------------------------------------------------------------------------------------------


def open_data(config: ml_collections.ConfigDict) -> list[datasets_lib.Dataset]:
    """The training datasets, from the folders under ``data.data_root`` or (``data.source`` "tfds") the prepared
    TFDS datasets in ``data.tfds_data_dir``; synthetic ones generated first when ``data.synthetic`` > 0 and absent
    (for "tfds": into data_root's folders, then prepared from them)."""
    root = config.data.data_root
    if config.data.source == "tfds":
        from pisam_jax.data import tfds as tfds_data

        names = tfds_data.resolve_names(config.data.datasets)
    elif config.data.source == "folders":
        names = datasets_lib.resolve_names(config.data.datasets)
    else:
        raise UsageError(f"config.data.source must be 'folders' or 'tfds', not {config.data.source!r}")
    if config.data.synthetic > 0:
        from pisam_jax.data import synthetic

        for name in names:
            spec = datasets_lib.DATASETS.get(name)
            if spec is None:
                raise UsageError(f"synthetic data is generated for the datasets of the folder layouts, not {name}")
            im = Path(root) / spec.image_dir
            if jax.process_index() == 0 and not (im.is_dir() and any(im.iterdir())):
                if Path(root) / spec.image_dir != (Path(root) / spec.gt_dir).parent / "im":
                    raise UsageError(f"synthetic data can only be generated for the DIS5K layout, not {name}")
                synthetic.generate(str(im.parent), config.data.synthetic, size=config.data.synthetic_size,
                                   seed=config.seed, progress=config.progress, detail=config.data.synthetic_detail)
        if config.data.source == "tfds" and jax.process_index() == 0:
            tfds_data.prepare_datasets(names, config.data.tfds_data_dir or None, root, progress=config.progress)
        _barrier("synthetic_data")
    if config.data.source == "tfds":
        return tfds_data.open_datasets(names, config.data.tfds_data_dir or None)
    if not Path(root).is_dir():
        raise UsageError(
            f"config.data.data_root {root}: folder not found; point it at the datasets (README: data layout) "
            "or set config.data.synthetic to generate synthetic data there"
        )
    return datasets_lib.open_datasets(names, root, skip_bad=config.data.skip_bad)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def make_iterator(config, datasets, image_size: int):
    if config.data.augment:
        augment = pipeline.TrainAugment(size=image_size)
    else:  # deterministic: long side to image_size, pad (what the embedding cache needs)
        augment = pipeline.TrainAugment(size=image_size, scale_range=(1.0, 1.0), flip_p=0.0)
    ds = pipeline.train_dataset(
        datasets,
        batch_size=config.batch_size // jax.process_count(),
        seed=config.seed,
        augment=augment,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        threads=config.data.threads,
        prefetch=config.data.prefetch,
        workers=config.data.workers,
    )
    return iter(ds)


# -- model -----------------------------------------------------------------------------------------


def copy_matching(src: nnx.Module, dst: nnx.Module) -> tuple[list[str], list[str]]:
    """Copies every variable of ``src`` whose path and shape exist in ``dst``; returns (copied, fresh) paths."""
    src_flat = dict(nnx.state(src, nnx.Variable).flat_state())
    dst_state = nnx.state(dst, nnx.Variable)
    copied, fresh = [], []
    new = []
    for path, var in dst_state.flat_state():
        s = src_flat.get(path)
        name = ".".join(str(p) for p in path)
        if s is not None and np.shape(s.get_value()) == np.shape(var.get_value()):
            new.append((path, var.replace(jnp.asarray(s.get_value()))))
            copied.append(name)
        else:
            new.append((path, var))
            fresh.append(name)
    nnx.update(dst, nnx.State.from_flat_path(new))
    return copied, fresh


def initial_model(config: ml_collections.ConfigDict, stage: Stage) -> tuple[models.Sam, dict[str, Any]]:
    """The model ``stage`` trains: weights from ``init_from`` where its paths and shapes match, the rest fresh.

    ``init_from``: a model directory (converted or exported) or a training workdir (its latest checkpoint); empty
    only with ``allow_random_init`` (a SAM from scratch, or tests). A fresh parameter must be one the stage trains.
    """
    overrides = model_overrides(config)
    decoder = dict(decoder=stage.decoder, interactor=stage.interactor)
    if not config.init_from:
        if not config.allow_random_init:
            raise UsageError(
                "config.init_from is empty: give a converted SAM model directory (python -m convert.sam), "
                "or for stage 2 a stage-1 workdir or export"
            )
        try:
            cfg = ModelConfig.preset(config.model.model_type, **decoder, **overrides)
        except (TypeError, models.ModelError) as e:
            raise UsageError(f"config.model: {e}") from None
        return models.build_model(cfg, seed=config.seed), {"init": "random", "stage": stage.name}

    src_path = Path(config.init_from)
    if not src_path.is_dir():
        raise UsageError(
            f"config.init_from {src_path}: directory not found; convert a SAM checkpoint first "
            "(python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out DIR) or give a training workdir"
        )
    if ckpt_lib.is_workdir(src_path):
        src, src_step = ckpt_lib.load_workdir_model(src_path)
        origin = {"init_from": str(src_path.absolute()), "init_step": src_step}
    else:
        src = models.load_model(src_path)
        origin = {"init_from": str(src_path.absolute())}
    sc = src.config
    fields = {f.name: getattr(sc, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(provenance={}, **decoder)
    for k, v in overrides.items():
        if k in models.DECODER_FIELDS:  # the stage's own decoder: its variants are chosen here
            fields[k] = v
        elif fields.get(k) != v:
            raise UsageError(f"config.model.{k}={v} disagrees with init_from's {k}={fields.get(k)} ({src_path})")
    if stage.interactor and sc.decoder != "pi":
        raise UsageError(
            f"stage {stage.name} starts from a stage-1 Pi-SAM (its workdir or export); {src_path} has a "
            f"{sc.decoder!r} decoder"
        )
    model = models.build_model(ModelConfig(**fields), seed=config.seed)
    copied, fresh = copy_matching(src, model)
    trains = stage.trainable()
    trained_paths = {".".join(str(p) for p in path) for path, _ in nnx.state(model, trains).flat_state()}
    frozen_fresh = [p for p in fresh if p not in trained_paths and not p.startswith("mask_decoder.interact_2.")]
    if frozen_fresh:
        raise UsageError(
            f"init_from {src_path} lacks {frozen_fresh[0]}, which stage {stage.name} does not train "
            f"({len(frozen_fresh)} such parameters)"
        )
    origin.update(stage=stage.name, copied=len(copied), fresh=len(fresh))
    return model, origin


# -- the frozen encoder ------------------------------------------------------------------------------


def make_encode(graphdef, mesh):
    """Jitted frozen encoder: (train_state, frozen_state, images) -> (embeddings, interm[0]), no gradient."""

    def encode(train_state, frozen_state, images):
        model = nnx.merge(graphdef, train_state, frozen_state)
        emb, interm = model.image_encoder(stages.normalise(images))
        return jax.lax.stop_gradient(emb), jax.lax.stop_gradient(interm[0])

    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(encode, in_shardings=(rep, rep, data), out_shardings=(data, data))


def encoder_trains(train_state: nnx.State) -> bool:
    """Whether any trainable parameter belongs to the image encoder (then it runs inside the loss)."""
    return any(str(path[0]) == "image_encoder" for path, _ in train_state.flat_state())


def loss_fn_of(stage: Stage):
    """``stage.loss`` plus the debug hook ``debug.nan_at_step`` (a NaN in the batch makes the loss NaN)."""

    def loss_fn(model, batch, key):
        total, terms = stage.loss(model, batch, key)
        if "poison" in batch:
            total = total + batch["poison"].sum()
        return total, terms

    return loss_fn


class EmbeddingCache:
    """Host-memory cache of the frozen encoder's outputs, keyed by a digest of the (un-augmented) image.

    Only valid without augmentation (``check_config`` enforces it): then an image's pixels, hence its
    embedding, are the same every epoch. ``max_items`` bounds host memory (vit_b: 16 MiB an image).
    """

    def __init__(self, max_items: int = 100_000):
        self.max_items = max_items
        self.store: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(image: np.ndarray) -> bytes:
        return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()

    def lookup(self, images: np.ndarray):
        keys = [self.key(im) for im in images]
        found = [self.store.get(k) for k in keys]
        if all(f is not None for f in found):
            self.hits += len(keys)
            return keys, (np.stack([f[0] for f in found]), np.stack([f[1] for f in found]))
        self.misses += len(keys)
        return keys, None

    def add(self, keys, embeddings: np.ndarray, interm0: np.ndarray) -> None:
        for k, e, i in zip(keys, embeddings, interm0):
            if len(self.store) < self.max_items:
                self.store[k] = (e, i)


# -- the loop --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    step: int
    last_metrics: dict[str, float]
    export: str | None
    workdir: str


def _shard(tree, mesh):
    return step_lib.shard_batch(tree, mesh)


def _replicated_abstract(tree, mesh):
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=rep), tree)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Result:
    """Runs (or resumes) training in ``workdir``. Raises UsageError, Diverged."""
    check_config(config)
    stage = stages.get(config)
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    workdirs.prepare(workdir, config_json(config), write=is_main)
    _barrier("workdir")

    datasets = open_data(config)
    n_images = sum(len(d) for d in datasets)
    steps_per_epoch = config.steps_per_epoch or n_images // config.batch_size
    if steps_per_epoch <= 0:
        raise UsageError(
            f"{n_images} training images in {config.data.datasets} are fewer than one batch of {config.batch_size}"
        )
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    mesh = step_lib.make_data_mesh()
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    writer = log_lib.MetricWriter(workdir, enabled=is_main)

    # model, optimiser, data: fresh or resumed
    latest = ckpts.latest_step()
    filt = stage.trainable()
    lr = float(config.learning_rate)
    tx = step_lib.make_optimizer(steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs, learning_rate=lr,
                                 warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                                 lr_drop_epoch=config.lr_drop_epoch)
    if latest is None:
        model, provenance = initial_model(config, stage)
        models.set_dtype(model, config.get("dtype", None))
        graphdef, train_state, frozen_state = nnx.split(model, filt, ...)
        del model
        opt_state = tx.init(train_state)
        train_state, frozen_state, opt_state = step_lib.replicate((train_state, frozen_state, opt_state), mesh)
        data_iter = make_iterator(config, datasets, graphdef_config(graphdef, train_state, frozen_state).image_size)
        start = 0
    else:
        _, meta = ckpt_lib.read_meta(workdir, latest)
        if stages.stage_name(meta.get("stage")) != stage.name:
            raise UsageError(f"{workdir} holds a {meta.get('stage')} run; use another --workdir for {stage.name}")
        model_config = ModelConfig.from_json(meta["model_config"])
        provenance = meta.get("provenance", {})
        abstract = models.abstract_model(model_config, config.get("dtype", None))
        graphdef, train_state, frozen_state = nnx.split(abstract, filt, ...)
        opt_state = jax.eval_shape(tx.init, train_state)
        data_iter = make_iterator(config, datasets, model_config.image_size)
        restored = ckpts.restore(
            latest,
            train_state=_replicated_abstract(train_state, mesh),
            frozen_state=_replicated_abstract(frozen_state, mesh),
            opt_state=_replicated_abstract(opt_state, mesh),
            data_iter=data_iter,
        )
        train_state, frozen_state, opt_state = restored["train"], restored["frozen"], restored["opt"]
        start = latest
    writer.truncate_after(start)
    model_config = graphdef_config(graphdef, train_state, frozen_state)

    if is_main:
        counts = trainable.param_counts(nnx.merge(graphdef, train_state, frozen_state), filt)
        print(f"{stage.name}: training {counts['total']:,} parameters ({', '.join(stage.trainable_modules())}); "
              f"{n_images} images, {steps_per_epoch} steps/epoch, steps {start} -> {total_steps}, global batch "
              f"{config.batch_size} on {jax.device_count()} devices / {jax.process_count()} processes"
              + (" (resumed)" if start else ""), flush=True)

    frozen_encoder = not encoder_trains(train_state)
    encode = make_encode(graphdef, mesh) if frozen_encoder else None
    stage.setup(graphdef, mesh)
    train_step = step_lib.make_train_step(graphdef, loss_fn_of(stage), tx, mesh=mesh)
    params_finite = jax.jit(step_lib.all_finite)
    cache = EmbeddingCache() if config.cache_embeddings and frozen_encoder else None
    images_every = int(config.log_images_every)
    sample_logger = None
    if images_every:  # off: nothing read, nothing compiled
        sample_logger = samples.SampleLogger(
            graphdef, mesh, samples.fixed_samples(datasets, config.log_images_count, model_config.image_size),
            stage=stage, seed=config.seed, size=config.log_images_size)
    base_key = jax.random.key(config.seed)
    nan_step = int(config.debug.nan_at_step)

    def save(step_no: int) -> None:
        if not bool(params_finite(train_state)):
            raise Diverged(f"non-finite parameters after step {step_no}")
        meta = dict(step=step_no, stage=stage.name, trainable=list(stage.trainable_modules()),
                    model_config=model_config.to_json(), provenance=provenance, config=config_json(config))
        ckpts.save(step_no, train_state=train_state, frozen_state=frozen_state, opt_state=opt_state,
                   data_iter=data_iter, meta=meta)

    bar = log_lib.progress_bar(total_steps, start, enabled=is_main and config.progress, desc=stage.name)
    metrics: dict[str, float] = {}
    last_saved = latest
    window: list[dict[str, float]] = []  # the train step's metrics since the last log line
    try:
        for s in range(start, total_steps):
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            host = {k: np.asarray(batch[k]) for k in ("image", "mask", "box", "has_object", "input_size")}
            if s == nan_step:
                host["poison"] = np.full((host["image"].shape[0],), np.nan, np.float32)
            dev = _shard(host, mesh)
            if frozen_encoder:
                dev.update(frozen_features(encode, cache, train_state, frozen_state, host["image"], dev["image"]))
            th = time.perf_counter()
            dev, host_metrics = stage.prepare(train_state, frozen_state, dev, s)
            host_time = time.perf_counter() - th
            key = jax.random.fold_in(base_key, s)
            train_state, opt_state, m = train_step(train_state, frozen_state, opt_state, dev, key)
            try:
                step_metrics = step_lib.check_finite(m, s + 1)
            except FloatingPointError as e:
                raise Diverged(str(e)) from None
            window.append(step_metrics)
            dt = time.perf_counter() - t0
            metrics = dict(step_metrics, **host_metrics, step_time=dt, data_time=t_data,
                           images_per_s=config.batch_size / dt, epoch=s // steps_per_epoch,
                           prepare_fraction=host_time / dt)
            if cache is not None:
                metrics["cache_hits"] = cache.hits
            done = s + 1
            if done % config.log_every_steps == 0 or done == total_steps:
                # the loss and its terms as means over the window, the timings as measured on this step
                writer.write(done, dict(metrics, **{k: float(np.mean([w[k] for w in window])) for k in window[0]}))
                window = []
            if sample_logger is not None and done % images_every == 0:  # every process: the forward is SPMD
                sample_logger.log(done, train_state, frozen_state, writer)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('learning_rate', lr):.2e}")
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                save(done)
                last_saved = done
    except Diverged as e:
        ckpts.wait()
        where = f"step {last_saved} in {ckpts.directory}" if last_saved else "none (no checkpoint yet)"
        raise Diverged(f"training diverged: {e}. Last good checkpoint: {where}") from None
    finally:
        bar.close()
        writer.close()
    ckpts.close()

    export_path = None
    if jax.process_count() == 1 and total_steps > start:
        model = nnx.merge(graphdef, train_state, frozen_state)
        export_path = str(ckpt_lib.export(model, workdir / EXPORT_DIR, overwrite=True, provenance={
            "trained_in": str(workdir), "stage": stage.name, "step": total_steps}))
    _barrier("done")
    return Result(step=total_steps, last_metrics=metrics, export=export_path, workdir=str(workdir))


def frozen_features(encode, cache, train_state, frozen_state, images: np.ndarray, images_dev) -> dict[str, jax.Array]:
    """The frozen encoder's outputs for this step's images: from the cache when every image is in it."""
    mesh = images_dev.sharding.mesh
    feats = None
    if cache is not None:
        keys, feats = cache.lookup(images)
    if feats is None:
        emb, interm0 = encode(train_state, frozen_state, images_dev)
        if cache is not None:
            cache.add(keys, step_lib.local_rows(emb), step_lib.local_rows(interm0))
    else:
        emb, interm0 = _shard(feats[0], mesh), _shard(feats[1], mesh)
    return {"embeddings": emb, "interm0": interm0}


def graphdef_config(graphdef, train_state, frozen_state) -> ModelConfig:
    """The ModelConfig carried by the model's graph (``Sam.config`` is static)."""
    return nnx.merge(graphdef, train_state, frozen_state).config
