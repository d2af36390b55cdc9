"""The training loop of Pi-SAM's two stages (PISAM_SPEC.md 5, 6; D2, D4, D8).

One step:

  * stage 1: frozen encoder -> (embeddings, interm[0]) outside the gradient (jitted on its own, or taken from
    the embedding cache); then the jitted train step: RGB embedding (trainable, D2), ``pi_base`` (box),
    ``pi_refine`` without clicks, ``stage1_loss`` on (256^2 logits, 1024^2 logits) vs mask / 255, weighted by
    ``has_object``;
  * stage 2: the frozen base forward (encoder, RGB embedding, ``pi_base``) jitted on its own; its 256^2
    logits go to the host, clicks are simulated there (``simulate_clicks_batch``, spec 6), then the jitted
    train step of ``interact_2`` + the HR head, ``stage2_loss`` weighted by valid * has_object. The host's
    share of the step time is logged (``host_fraction``).

Data parallel over a ``("data",)`` mesh of all devices (all hosts): ``batch_size`` is global, each host reads
its own shard of the data (``batch_size / process_count`` rows a step). Everything random is a function of
(seed, step): the loss points (``fold_in(key, step)``), the clicks (numpy ``default_rng((seed, step,
process))``) and the data (grain, whose iterator state is checkpointed), so a resumed run repeats an
uninterrupted one exactly.

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
from pisam_jax.data import clicks as clicks_lib
from pisam_jax.data import datasets as datasets_lib
from pisam_jax.data import pipeline
from pisam_jax.modeling.pi_decoder import PiBase
from pisam_jax.models import ImageFeatures, ModelConfig
from pisam_jax.training import checkpoints as ckpt_lib
from pisam_jax.training import logging as log_lib
from pisam_jax.training import losses, samples, trainable, workdirs
from pisam_jax.training import step as step_lib

PIXEL_MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.asarray([58.395, 57.12, 57.375], np.float32)
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
    if config.stage not in (1, 2):
        raise UsageError(f"config.stage must be 1 (HR mask decoder) or 2 (precise interactor), got {config.stage}")
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
    model_overrides(config)


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# -- data ------------------------------------------------------------------------------------------


def open_data(config: ml_collections.ConfigDict) -> list[datasets_lib.Dataset]:
    """The training datasets; synthetic ones generated first when ``data.synthetic`` > 0 and absent."""
    root = config.data.data_root
    names = datasets_lib.resolve_names(config.data.datasets)
    if config.data.synthetic > 0:
        from pisam_jax.data import synthetic

        for name in names:
            spec = datasets_lib.DATASETS[name]
            im = Path(root) / spec.image_dir
            if jax.process_index() == 0 and not (im.is_dir() and any(im.iterdir())):
                if Path(root) / spec.image_dir != (Path(root) / spec.gt_dir).parent / "im":
                    raise UsageError(f"synthetic data can only be generated for the DIS5K layout, not {name}")
                synthetic.generate(str(im.parent), config.data.synthetic, size=config.data.synthetic_size,
                                   seed=config.seed, progress=config.progress)
        _barrier("synthetic_data")
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


def initial_model(config: ml_collections.ConfigDict) -> tuple[models.Sam, dict[str, Any]]:
    """A Pi-SAM model for ``config.stage``: SAM (or stage-1) weights from ``init_from``, new modules fresh."""
    stage = config.stage
    overrides = model_overrides(config)
    if not config.init_from:
        if not config.allow_random_init:
            raise UsageError(
                "config.init_from is empty: give a converted SAM model directory (python -m convert.sam), "
                "or for stage 2 a stage-1 workdir or export"
            )
        try:
            cfg = ModelConfig.preset(config.model.model_type, "pi", interactor=stage == 2, **overrides)
        except (TypeError, models.ModelError) as e:
            raise UsageError(f"config.model: {e}") from None
        return models.build_model(cfg, seed=config.seed), {"init": "random", "stage": stage}

    src_path = Path(config.init_from)
    if not src_path.is_dir():
        raise UsageError(
            f"config.init_from {src_path}: directory not found; convert a SAM checkpoint first "
            "(python -m convert.sam --checkpoint sam_vit_b_01ec64.pth --out DIR) or give a stage-1 workdir"
        )
    if ckpt_lib.is_workdir(src_path):
        src, src_step = ckpt_lib.load_workdir_model(src_path)
        origin = {"init_from": str(src_path.absolute()), "init_step": src_step}
    else:
        src = models.load_model(src_path)
        origin = {"init_from": str(src_path.absolute())}
    sc = src.config
    fields = {f.name: getattr(sc, f.name) for f in dataclasses.fields(ModelConfig)}
    fields.update(decoder="pi", interactor=stage == 2, provenance={})
    for k, v in overrides.items():
        if fields.get(k) != v:
            raise UsageError(f"config.model.{k}={v} disagrees with init_from's {k}={fields.get(k)} ({src_path})")
    if stage == 2 and sc.decoder != "pi":
        raise UsageError(
            f"stage 2 starts from a stage-1 Pi-SAM (its workdir or export); {src_path} has a {sc.decoder!r} decoder"
        )
    cfg = ModelConfig(**fields)
    model = models.build_model(cfg, seed=config.seed)
    copied, fresh = copy_matching(src, model)
    frozen_fresh = [p for p in fresh if p.startswith(("image_encoder", "prompt_encoder"))]
    if frozen_fresh:
        raise UsageError(f"init_from {src_path} lacks SAM weights such as {frozen_fresh[0]}")
    origin.update(stage=stage, copied=len(copied), fresh=len(fresh))
    return model, origin


# -- jitted pieces ---------------------------------------------------------------------------------


def normalise(images: jax.Array) -> jax.Array:
    """uint8 (B, S, S, 3) -> SAM-normalised float32 (the loader pads with raw 128 before this, as the reference)."""
    return (images.astype(jnp.float32) - PIXEL_MEAN) / PIXEL_STD


def make_encode(graphdef, mesh):
    """Jitted frozen encoder: (train_state, frozen_state, images uint8) -> (embeddings, interm[0])."""

    def encode(train_state, frozen_state, images):
        model = nnx.merge(graphdef, train_state, frozen_state)
        emb, interm = model.image_encoder(normalise(images))
        return jax.lax.stop_gradient(emb), jax.lax.stop_gradient(interm[0])

    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(encode, in_shardings=(rep, rep, data), out_shardings=(data, data))


def _poison(total, batch):
    if "poison" in batch:  # debug.nan_at_step: NaN in, NaN out
        total = total + batch["poison"].sum()
    return total


def stage1_loss_fn(num_points: int):
    def loss_fn(model, batch, key):
        rgb = model.mask_decoder.rgb_embedding(normalise(batch["image"]))
        features = ImageFeatures(batch["embeddings"], (batch["interm0"],), rgb)
        base = model.pi_base(features, batch["box"][:, None])
        high = model.pi_refine(features, base)
        targets = batch["mask"].astype(jnp.float32) / 255.0
        total, terms = losses.stage1_loss(
            key, base.low_res, high, targets, weights=batch["has_object"], num_points=num_points
        )
        return _poison(total, batch), terms

    return loss_fn


def stage2_loss_fn(num_points: int):
    def loss_fn(model, batch, key):
        features = ImageFeatures(None, (), batch["rgb"])
        base = PiBase(batch["embedding"], batch["hyper_in"], batch["low_res"])
        high = model.pi_refine(features, base, (batch["points"], batch["labels"]))
        targets = batch["mask"].astype(jnp.float32) / 255.0
        weights = batch["valid"].astype(jnp.float32) * batch["has_object"].astype(jnp.float32)
        total, terms = losses.stage2_loss(key, high, targets, weights, num_points=num_points)
        terms = dict(terms, valid_fraction=batch["valid"].astype(jnp.float32).mean())
        return _poison(total, batch), terms

    return loss_fn


def make_stage2_base(graphdef, mesh):
    """Jitted frozen base forward of stage 2: -> (rgb, PiBase, GT resized to the low-res grid, 0..255)."""

    def base_fn(train_state, frozen_state, embeddings, interm0, images, boxes, masks):
        model = nnx.merge(graphdef, train_state, frozen_state)
        rgb = model.mask_decoder.rgb_embedding(normalise(images))
        features = ImageFeatures(embeddings, (interm0,), rgb)
        base = model.pi_base(features, boxes[:, None])
        h, w = base.low_res.shape[-2:]
        # labels_256 = F.interpolate(labels, (256, 256), bilinear): half-pixel centres, no antialias
        low_gt = jax.image.resize(masks.astype(jnp.float32), (masks.shape[0], h, w), "linear", antialias=False)
        return jax.lax.stop_gradient((rgb, base, low_gt))

    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(base_fn, in_shardings=(rep, rep, data, data, data, data, data), out_shardings=data)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (one copy per row)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


# -- embedding cache -------------------------------------------------------------------------------


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
    stage = config.stage
    mesh = step_lib.make_data_mesh()
    ckpts = ckpt_lib.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    writer = log_lib.MetricWriter(workdir, enabled=is_main)

    # model, optimiser, data: fresh or resumed
    latest = ckpts.latest_step()
    filt = trainable.trainable_filter(stage)
    lr = float(config.learning_rate)
    tx = step_lib.make_optimizer(steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs, learning_rate=lr)
    if latest is None:
        model, provenance = initial_model(config)
        graphdef, train_state, frozen_state = nnx.split(model, filt, ...)
        del model
        opt_state = tx.init(train_state)
        train_state, frozen_state, opt_state = step_lib.replicate((train_state, frozen_state, opt_state), mesh)
        data_iter = make_iterator(config, datasets, graphdef_config(graphdef, train_state, frozen_state).image_size)
        start = 0
    else:
        _, meta = ckpt_lib.read_meta(workdir, latest)
        if meta.get("stage") != stage:
            raise UsageError(f"{workdir} holds a stage-{meta.get('stage')} run; use another --workdir for stage {stage}")
        model_config = ModelConfig.from_json(meta["model_config"])
        provenance = meta.get("provenance", {})
        abstract = models.abstract_model(model_config)
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
        print(f"stage {stage}: training {counts['total']:,} parameters; {n_images} images, {steps_per_epoch} "
              f"steps/epoch, steps {start} -> {total_steps}, global batch {config.batch_size} on "
              f"{jax.device_count()} devices / {jax.process_count()} processes" + (" (resumed)" if start else ""),
              flush=True)

    encode = make_encode(graphdef, mesh)
    loss_fn = (stage1_loss_fn if stage == 1 else stage2_loss_fn)(config.num_points)
    train_step = step_lib.make_train_step(graphdef, loss_fn, tx, mesh=mesh)
    base_fn = make_stage2_base(graphdef, mesh) if stage == 2 else None
    params_finite = jax.jit(step_lib.all_finite)
    cache = EmbeddingCache() if config.cache_embeddings else None
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
        meta = dict(step=step_no, stage=stage, model_config=model_config.to_json(), provenance=provenance,
                    config=config_json(config))
        ckpts.save(step_no, train_state=train_state, frozen_state=frozen_state, opt_state=opt_state,
                   data_iter=data_iter, meta=meta)

    bar = log_lib.progress_bar(total_steps, start, enabled=is_main and config.progress)
    metrics: dict[str, float] = {}
    last_saved = latest
    window: list[float] = []  # losses since the last log line
    try:
        for s in range(start, total_steps):
            t0 = time.perf_counter()
            batch = next(data_iter)
            t_data = time.perf_counter() - t0
            images = np.asarray(batch["image"])
            feats = None
            if cache is not None:
                keys, feats = cache.lookup(images)
            if feats is None:
                emb, interm0 = encode(train_state, frozen_state, _shard(images, mesh))
                if cache is not None:
                    cache.add(keys, local_rows(emb), local_rows(interm0))
            else:
                emb, interm0 = _shard(feats[0], mesh), _shard(feats[1], mesh)
            host = {k: np.asarray(batch[k]) for k in ("image", "mask", "box", "has_object")}
            if s == nan_step:
                host["poison"] = np.full((images.shape[0],), np.nan, np.float32)
            host_time = 0.0
            if stage == 1:
                dev = _shard(host, mesh)
                dev.update(embeddings=emb, interm0=interm0)
            else:
                g = _shard(host, mesh)
                rgb, base, low_gt = base_fn(train_state, frozen_state, emb, interm0, g["image"], g["box"], g["mask"])
                th = time.perf_counter()
                low = local_rows(base.low_res)[:, 0]
                gt = local_rows(low_gt)
                rng = np.random.default_rng((config.seed, s, jax.process_index()))
                sim = clicks_lib.simulate_clicks_batch(low > 0, gt, rng, mode="train")
                labels = np.where(sim["pad"], -1, sim["flags"]).astype(np.int32)
                extra = {"points": sim["points"], "labels": labels, "valid": sim["valid"]}
                if "poison" in host:
                    extra["poison"] = host["poison"]
                extra = _shard(extra, mesh)
                host_time = time.perf_counter() - th
                dev = dict(rgb=rgb, embedding=base.embedding, hyper_in=base.hyper_in, low_res=base.low_res,
                           mask=g["mask"], has_object=g["has_object"], **extra)
            key = jax.random.fold_in(base_key, s)
            train_state, opt_state, m = train_step(train_state, frozen_state, opt_state, dev, key)
            try:
                metrics = step_lib.check_finite(m, s + 1)
            except FloatingPointError as e:
                raise Diverged(str(e)) from None
            dt = time.perf_counter() - t0
            metrics.update(step_time=dt, data_time=t_data, images_per_s=config.batch_size / dt,
                           epoch=s // steps_per_epoch)
            if stage == 2:
                metrics["host_fraction"] = host_time / dt
            if cache is not None:
                metrics["cache_hits"] = cache.hits
            done = s + 1
            window.append(metrics["loss"])
            if done % config.log_every_steps == 0 or done == total_steps:
                writer.write(done, dict(metrics, loss_avg=float(np.mean(window))))
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
        export_path = str(ckpt_lib.export(model, workdir / EXPORT_DIR, overwrite=True,
                                          provenance={"trained_in": str(workdir), "stage": stage, "step": total_steps}))
    _barrier("done")
    return Result(step=total_steps, last_metrics=metrics, export=export_path, workdir=str(workdir))


def graphdef_config(graphdef, train_state, frozen_state) -> ModelConfig:
    """The ModelConfig carried by the model's graph (``Sam.config`` is static)."""
    return nnx.merge(graphdef, train_state, frozen_state).config
