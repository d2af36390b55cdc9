"""Training-step throughput and peak memory, with and without the embedding cache.

    python -m bench.train_step                       # tiny and vit_b, cache off and on (vit_b: batch 1)
    python -m bench.train_step --cases tiny --steps 5 --batch 2
    python -m bench.train_step --torch --cases tiny,vit_b   # the stage-1 step, ours vs the PyTorch reference

One JSON line per case: model, stage, image size, batch, cache, images/s (steady state, after a warm-up
step), step time split (encoder vs train step), peak host RSS and, where the backend reports it, peak device
memory. Each case runs in its own subprocess so peak memory is per case. Random weights and random images
(speed does not depend on them). Without the cache a step = frozen encoder forward + the jitted train step;
with it the encoder outputs come from host memory (a blake2b digest of the image keys them, as in training).

``--torch``: the stage-1 train step side by side with the PyTorch reference's (``compare_stage1``), the same
work on both sides from the same batch and the same encoder outputs (random, on the device: the frozen
encoder is benchmarked by ``bench.encoder``): the batch's images, masks and boxes go from the host to the
device; the frozen prompt encoder embeds the box; the decoder (``references.pisam.MaskDecoderAE``, whose HQ and
Pi-SAM modules and RGB embedding train) runs forward to the 256^2 and 1024^2 logits; the stage-1 loss
(``references.losses.ref_loss_masks`` on both, 112^2 points each, as ``losses.stage1_loss``); backward; one
Adam step (lr 1e-3, betas (0.9, 0.999), eps 1e-8) on the trainable parameters. fp32 on both sides (JAX at
"highest" precision, torch without TF32), the same threads; median of ``--steps`` steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CASES = {
    "tiny": dict(model_type="vit_b", image_size=256, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                 encoder_global_attn_indexes=(1,), window_size=7),
    "tiny128": dict(model_type="vit_b", image_size=128, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2,
                    encoder_global_attn_indexes=(1,), window_size=7),
    "tiny1024": dict(model_type="vit_b", image_size=1024, encoder_embed_dim=64, encoder_depth=2,
                     encoder_num_heads=2, encoder_global_attn_indexes=(1,), window_size=7),
    "vit_b": dict(model_type="vit_b"),
    "vit_l": dict(model_type="vit_l"),
    "vit_h": dict(model_type="vit_h"),
}


def jitted_step(model, stage):
    """The training loop's pieces for ``model`` at ``stage`` on this host's devices: (graphdef, train_state,
    frozen_state, opt_state, mesh, the jitted train step)."""
    from flax import nnx

    from pisam_jax.training import loop
    from pisam_jax.training import step as step_lib

    graphdef, train_state, frozen_state = nnx.split(model, stage.trainable(), ...)
    tx = step_lib.make_optimizer(steps_per_epoch=100, num_epochs=100)
    opt_state = tx.init(train_state)
    mesh = step_lib.make_data_mesh()
    train_state, frozen_state, opt_state = step_lib.replicate((train_state, frozen_state, opt_state), mesh)
    return graphdef, train_state, frozen_state, opt_state, mesh, step_lib.make_train_step(
        graphdef, loop.loss_fn_of(stage), tx, mesh=mesh)


def run_case(name: str, batch: int, cache: bool, steps: int, stage: int = 1) -> dict:
    import jax
    import numpy as np

    from configs import common
    from pisam_jax.models import ModelConfig, build_model
    from pisam_jax.training import loop, stages
    from pisam_jax.training import step as step_lib

    fields = dict(CASES[name])
    cfg = ModelConfig.preset(fields.pop("model_type"), "pi", interactor=stage == 2, **fields)
    model = build_model(cfg, seed=0)
    config = common.get_config()
    config.stage = f"stage{stage}"
    graphdef, train_state, frozen_state, opt_state, mesh, train_step = jitted_step(model, stages.get(config))
    del model
    encode = loop.make_encode(graphdef, mesh)

    s = cfg.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:s, :s]
    mask = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (s / 4) ** 2).astype(np.uint8) * 255
    host = dict(image=images, mask=np.repeat(mask[None], batch, 0),
                box=np.tile(np.array([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]], np.float32), (batch, 1)),
                has_object=np.ones((batch,), bool))
    store = loop.EmbeddingCache()

    def one_step(i):
        nonlocal train_state, opt_state
        t0 = time.perf_counter()
        feats = None
        if cache:
            keys, feats = store.lookup(images)
        if feats is None:
            emb, interm0 = encode(train_state, frozen_state, step_lib.shard_batch(images, mesh))
            if cache:
                store.add(keys, step_lib.local_rows(emb), step_lib.local_rows(interm0))
        else:
            emb, interm0 = step_lib.shard_batch(feats[0], mesh), step_lib.shard_batch(feats[1], mesh)
        jax.block_until_ready(emb)
        t1 = time.perf_counter()
        dev = step_lib.shard_batch(host, mesh)
        dev.update(embeddings=emb, interm0=interm0)
        train_state, opt_state, m = train_step(train_state, frozen_state, opt_state, dev, jax.random.key(i))
        jax.block_until_ready(m["loss"])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    t = time.perf_counter()
    one_step(0)  # compile (and, with the cache, fill it)
    compile_s = time.perf_counter() - t
    enc, stp = [], []
    for i in range(steps):
        a, b = one_step(i + 1)
        enc.append(a)
        stp.append(b)
    total = sum(enc) + sum(stp)
    out = dict(case=name, stage=stage, image_size=s, batch=batch, cache=cache, devices=jax.device_count(),
               backend=jax.default_backend(), steps=steps, images_per_s=round(batch * steps / total, 4),
               step_s=round(total / steps, 4), encoder_or_cache_s=round(sum(enc) / steps, 4),
               train_step_s=round(sum(stp) / steps, 4), first_step_s=round(compile_s, 2),
               peak_host_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out


def compare_stage1(name: str, batch: int, steps: int) -> dict:
    """The stage-1 train step, ours vs the PyTorch reference's (module docstring): one JSON record."""
    import jax
    import numpy as np
    import torch
    from segment_anything.modeling import PromptEncoder

    from bench.encoder import median_seconds, random_model, sides, torch_device, torch_synced
    from configs import common
    from pisam_jax.models import ModelConfig
    from pisam_jax.training import stages
    from pisam_jax.training import step as step_lib
    from pisam_jax.training.trainable import TRAINABLE
    from pisam_jax.transforms import PIXEL_MEAN, PIXEL_STD
    from references.losses import ref_loss_masks
    from references.pisam import MaskDecoderAE

    fields = dict(CASES[name])
    cfg = ModelConfig.preset(fields.pop("model_type"), "pi", **fields)
    config = common.get_config()
    config.stage = "stage1"
    stage = stages.get(config)
    s, g, c_vit = cfg.image_size, cfg.embedding_size, cfg.encoder_embed_dim

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:s, :s]
    mask = (((yy - s / 2) ** 2 + (xx - s / 2) ** 2) < (s / 4) ** 2).astype(np.uint8) * 255
    host = dict(image=rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8), mask=np.repeat(mask[None], batch, 0),
                box=np.tile(np.array([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]], np.float32), (batch, 1)),
                has_object=np.ones((batch,), bool))
    emb = rng.standard_normal((batch, g, g, 256), dtype=np.float32)
    interm0 = rng.standard_normal((batch, g, g, c_vit), dtype=np.float32)

    # Ours: the training loop's jitted step on the encoder outputs given in the batch.
    jax.config.update("jax_default_matmul_precision", "highest")  # true fp32, as torch without TF32
    _, train_state, frozen_state, opt_state, mesh, train_step = jitted_step(random_model(cfg), stage)
    features = dict(embeddings=step_lib.shard_batch(emb, mesh), interm0=step_lib.shard_batch(interm0, mesh))
    count = iter(range(10**6))

    def ours_step():
        nonlocal train_state, opt_state
        dev = {**step_lib.shard_batch(host, mesh), **features}
        train_state, opt_state, m = train_step(train_state, frozen_state, opt_state, dev, jax.random.key(next(count)))
        return jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    ours_step()
    compile_s = time.perf_counter() - t0
    ours_s = median_seconds(ours_step, steps)

    # PyTorch: the reference decoder, SAM's prompt encoder, the reference losses, torch.optim.Adam.
    device = torch_device()
    torch.manual_seed(0)
    decoder = MaskDecoderAE(c_vit).to(device).train()
    rgb_embed = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1)).to(device)
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(g, g), input_image_size=(s, s),
                                   mask_in_chans=16).to(device)
    trained = {m.split(".", 1)[1] for m in TRAINABLE["stage1"]} - {"rgb_embed"}
    for name_, p in decoder.named_parameters():
        p.requires_grad_(name_.split(".")[0] in trained)
    prompt_encoder.requires_grad_(False)
    params = [p for p in decoder.parameters() if p.requires_grad] + list(rgb_embed.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD))
    emb_t = torch.from_numpy(emb.transpose(0, 3, 1, 2).copy()).to(device)
    interm0_t = torch.from_numpy(interm0).to(device)
    rand = lambda *shape: torch.rand(*shape, device=device)  # noqa: E731

    @torch_synced
    def torch_step():
        image = torch.from_numpy(host["image"]).to(device).permute(0, 3, 1, 2).float()
        target = torch.from_numpy(host["mask"]).to(device)[:, None].float() / 255.0
        valid = torch.from_numpy(host["has_object"]).to(device).float()
        with torch.no_grad():
            sparse, dense = prompt_encoder(points=None, boxes=torch.from_numpy(host["box"]).to(device), masks=None)
            image_pe = prompt_encoder.get_dense_pe()
        rgb = rgb_embed((image - mean) / std)
        low, high = decoder(emb_t, image_pe, sparse, dense, [interm0_t, rgb])
        loss = sum(sum(ref_loss_masks(pred, target, batch, config.num_points, rand, valid=valid)[:2])
                   for pred in (low, high))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    torch_step()  # warm-up
    torch_s = median_seconds(torch_step, steps)
    return dict(case="train_step", model_type=name, stage="stage1", image_size=s, batch=batch, steps=steps,
                **sides(ours_s, torch_s, "float32", "float32", device), compile_s=round(compile_s, 2),
                num_points=config.num_points)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny,vit_b", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--batch", type=int, default=0, help="per-case batch (default: 2 for tiny, 1 otherwise)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    p.add_argument("--cache", default="off,on", help="off, on or off,on")
    p.add_argument("--torch", action="store_true", help="the stage-1 step, ours vs the PyTorch reference")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one case in this process
    a = p.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    if unknown := [c for c in cases if c not in CASES]:
        print(f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if a.torch:
        for c in cases:
            print(json.dumps(compare_stage1(c, a.batch or (2 if c.startswith("tiny") else 1), a.steps)), flush=True)
        return 0
    modes = [m == "on" for m in a.cache.split(",")]
    if a.one:
        print(json.dumps(run_case(cases[0], a.batch, modes[0], a.steps)), flush=True)
        return 0
    for c in cases:
        batch = a.batch or (2 if c.startswith("tiny") else 1)
        for on in modes:
            cmd = [sys.executable, "-m", "bench.train_step", "--one", "--cases", c, "--batch", str(batch),
                   "--steps", str(a.steps), "--cache", "on" if on else "off"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                print(json.dumps(dict(case=c, cache=on, error=proc.stderr.strip().splitlines()[-1:])), flush=True)
            else:
                print(lines[-1], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
