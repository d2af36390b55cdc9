"""End-to-end training with ``train.py`` on the tiny recipe (configs/tiny.py): resume after SIGKILL equals an
uninterrupted run, stage 1 -> stage 2, the export loads, sample predictions in TensorBoard, the NaN guard, user
errors, 8 devices = 1 device, and two processes with ``jax.distributed``.

Every run is a subprocess (as a user runs it). They share one persistent XLA compilation cache, so only the
first run pays for compiling the model.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY1 = "configs/tiny.py:stage1"
TINY2 = "configs/tiny.py:stage2"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    from pisam_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    synthetic.generate(str(root / "DIS5K" / "DIS-TR"), 8, size=384, seed=0, progress=False)
    return str(root)


def _env(devices: int = 1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _args(config, workdir, cache_dir, data_root, *extra):
    return [
        sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}",
        f"--compilation_cache={cache_dir}", f"--config.data.data_root={data_root}",
        "--config.progress=False", "--config.log_every_steps=1", *extra,
    ]


def run_train(config, workdir, cache_dir, data_root, *extra, devices=1, timeout=600):
    return subprocess.run(
        _args(config, workdir, cache_dir, data_root, *extra),
        cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=timeout,
    )


def losses_of(workdir):
    from pisam_jax.training.logging import read_jsonl

    return {r["step"]: r for r in read_jsonl(Path(workdir) / "metrics.jsonl")}


def ckpt_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, cache_dir, data_root, tiny_sam):
    """An uninterrupted 6-step stage-1 run from a converted (tiny, random) SAM, checkpoints every 2 steps, sample
    predictions of 2 images every 3 steps (the SIGKILL test resumes without them: they must not change training)."""
    workdir = tmp_path_factory.mktemp("stage1") / "run"
    proc = run_train(TINY1, workdir, cache_dir, data_root, "--config.max_steps=6",
                     "--config.checkpoint.every_steps=2", f"--config.init_from={tiny_sam[2]}",
                     "--config.log_images_every=3", "--config.log_images_count=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_stage1_runs_checkpoints_and_exports(stage1_run, tiny_sam):
    from flax import nnx

    from pisam_jax import load_model

    records = losses_of(stage1_run)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for r in records.values():
        assert {"loss", "bce_256", "dice_256", "bce_1024", "dice_1024", "learning_rate", "images_per_s",
                "step_time", "grad_norm"} <= set(r)
        assert np.isfinite(r["loss"])
    assert ckpt_steps(stage1_run) == [4, 6]  # keep = 2
    assert (stage1_run / "tensorboard").is_dir() and any((stage1_run / "tensorboard").iterdir())
    model = load_model(stage1_run / "export")
    assert model.config.decoder == "pi" and not model.config.interactor
    assert model.config.provenance["step"] == 6
    # SAM's weights came from init_from and stayed frozen; the Pi-SAM modules are new
    sam = dict(nnx.state(load_model(tiny_sam[2]), nnx.Variable).flat_state())
    pi = dict(nnx.state(model, nnx.Variable).flat_state())
    assert set(sam) < set(pi)
    for p in sam:
        np.testing.assert_array_equal(np.asarray(pi[p].get_value()), np.asarray(sam[p].get_value()), err_msg=str(p))


def test_stage1_writes_sample_predictions(stage1_run):
    from tests.test_train_samples import read_images, split_panel

    images = read_images(stage1_run / "tensorboard")
    assert sorted(images) == [("samples/0", 3), ("samples/0", 6), ("samples/1", 3), ("samples/1", 6)]
    for i in (0, 1):
        a, b = images[(f"samples/{i}", 3)], images[(f"samples/{i}", 6)]
        assert a.shape == b.shape and a.shape[0] <= 256 and a.shape[1] <= 3 * 256 + 8  # tiles <= 256 px (256 model)
        (img_a, gt_a, pred_a), (img_b, gt_b, _) = split_panel(a), split_panel(b)
        np.testing.assert_array_equal(img_a, img_b)  # the same samples at every step
        np.testing.assert_array_equal(gt_a, gt_b)
        assert gt_a.max() == 255 and gt_a.min() == 0
        assert set(np.unique(pred_a)) <= {0, 255}  # tiles are at the model's 256 px: no downscaling, binary
    # the current parameters predict: three optimiser steps change the masks
    assert any(not np.array_equal(split_panel(images[(f"samples/{i}", 3)])[2],
                                  split_panel(images[(f"samples/{i}", 6)])[2]) for i in (0, 1))


@pytest.mark.heavy
def test_sigkill_and_resume_repeats_the_uninterrupted_run(stage1_run, tmp_path, cache_dir, data_root, tiny_sam):
    workdir = tmp_path / "killed"
    init = f"--config.init_from={tiny_sam[2]}"
    args = _args(TINY1, workdir, cache_dir, data_root, "--config.max_steps=6", "--config.checkpoint.every_steps=2", init)
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and 2 not in ckpt_steps(workdir) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-3000:]
        assert 2 in ckpt_steps(workdir), "no checkpoint at step 2 in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(ckpt_steps(workdir)) < 6

    resumed = run_train(TINY1, workdir, cache_dir, data_root, "--config.max_steps=6",
                        "--config.checkpoint.every_steps=2", init)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(resumed)" in resumed.stdout
    want, got = losses_of(stage1_run), losses_of(workdir)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for s in want:
        for k in ("loss", "bce_256", "dice_256", "bce_1024", "dice_1024", "learning_rate"):
            np.testing.assert_allclose(got[s][k], want[s][k], rtol=1e-6, err_msg=f"step {s} {k}")


@pytest.mark.heavy
def test_stage2_from_stage1_workdir(stage1_run, tmp_path, cache_dir, data_root):
    from pisam_jax import load_model
    from pisam_jax.training.checkpoints import load_workdir_model

    workdir = tmp_path / "stage2"
    proc = run_train(TINY2, workdir, cache_dir, data_root, f"--config.init_from={stage1_run}",
                     "--config.max_steps=2", "--config.checkpoint.every_steps=2", "--config.log_images_every=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = losses_of(workdir)
    assert sorted(records) == [1, 2]
    from tests.test_train_samples import read_images

    assert sorted(read_images(workdir / "tensorboard")) == [("samples/0", 2), ("samples/1", 2)]  # tiny: 2 samples
    assert {"bce_1024", "dice_1024", "valid_fraction", "prepare_fraction"} <= set(records[2])
    exported = load_model(workdir / "export")
    assert exported.config.interactor
    # everything but interact_2 is the stage-1 model, unchanged
    stage1, _ = load_workdir_model(stage1_run)
    from flax import nnx

    a = dict(nnx.state(stage1, nnx.Variable).flat_state())
    b = dict(nnx.state(exported, nnx.Variable).flat_state())
    assert set(a) < set(b)
    assert all(p[1] == "interact_2" for p in set(b) - set(a))
    for p in a:
        np.testing.assert_array_equal(np.asarray(a[p].get_value()), np.asarray(b[p].get_value()), err_msg=str(p))


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, data_root):
    workdir = tmp_path / "nan"
    proc = run_train(TINY1, workdir, cache_dir, data_root, "--config.max_steps=6",
                     "--config.checkpoint.every_steps=2", "--config.debug.nan_at_step=2")  # step index 2 = step 3
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "diverged" in last and "loss=nan" in last and "step 2" in last, last
    assert ckpt_steps(workdir) == [2]
    assert sorted(losses_of(workdir)) == [1, 2]


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--config.no_such_field=1"], "no_such_field"),
        (["--config.init_from=/no/such/sam"], "/no/such/sam"),
        (["--config.data.data_root=/no/such/data", "--config.data.synthetic=0"], "/no/such/data"),
        (["--config.cache_embeddings=True"], "augment"),
        (["--config.model.no_such_size=3"], "no_such_size"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, cache_dir, data_root, extra, expect):
    args = _args(TINY1, tmp_path / "w", cache_dir, data_root, *extra)
    if any("data_root=/no/such" in a for a in extra):
        args = [a for a in args if not a.startswith("--config.data.data_root=") or "/no/such" in a]
    proc = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.heavy
def test_eight_devices_equal_one_device(tmp_path, cache_dir, data_root):
    common = ("--config.max_steps=2", "--config.batch_size=8", "--config.checkpoint.every_steps=2")
    one = run_train(TINY1, tmp_path / "one", cache_dir, data_root, *common, devices=1)
    assert one.returncode == 0, one.stderr[-4000:]
    eight = run_train(TINY1, tmp_path / "eight", cache_dir, data_root, *common, devices=8)
    assert eight.returncode == 0, eight.stderr[-4000:]
    assert "on 8 devices" in eight.stdout
    a, b = losses_of(tmp_path / "one"), losses_of(tmp_path / "eight")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        for k in ("loss", "bce_256", "dice_256", "bce_1024", "dice_1024", "grad_norm"):
            np.testing.assert_allclose(b[s][k], a[s][k], rtol=2e-5, atol=1e-6, err_msg=f"step {s} {k}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_train_and_checkpoint(tmp_path, cache_dir, data_root):
    port = _free_port()
    workdir = tmp_path / "multi"
    procs = []
    for i in range(2):
        args = _args(TINY1, workdir, cache_dir, data_root, "--config.max_steps=2",
                     "--config.checkpoint.every_steps=2", "--config.distributed=True",
                     "--config.log_images_every=2", "--config.log_images_count=1",  # 1 sample, padded to 2 rows
                     f"--config.coordinator_address=localhost:{port}", "--config.num_processes=2",
                     f"--config.process_id={i}")
        procs.append(subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=500))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "2 processes" in outs[0][0]
    assert ckpt_steps(workdir) == [2]
    data_files = sorted(f.name for f in (workdir / "checkpoints" / "2" / "data").iterdir())
    assert any("process_0" in f for f in data_files) and any("process_1" in f for f in data_files), data_files
    assert sorted(losses_of(workdir)) == [1, 2]  # process 0 writes the metrics
    from tests.test_train_samples import read_images

    assert sorted(read_images(workdir / "tensorboard")) == [("samples/0", 2)]  # ... and the sample panels, once
    assert not (workdir / "export").exists()  # multi-host: export afterwards with the checkpoints module
    proc = subprocess.run([sys.executable, "-m", "pisam_jax.training.checkpoints", str(workdir), str(tmp_path / "exp")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from pisam_jax import load_model

    assert load_model(tmp_path / "exp").config.decoder == "pi"


def test_embedding_cache_keys_by_image():
    from pisam_jax.training.loop import EmbeddingCache

    cache = EmbeddingCache(max_items=3)
    a = np.zeros((2, 8, 8, 3), np.uint8)
    a[1, 0, 0, 0] = 1
    keys, found = cache.lookup(a)
    assert found is None and keys[0] != keys[1]
    cache.add(keys, np.arange(2)[:, None] * np.ones((2, 4)), np.ones((2, 5)))
    keys2, found = cache.lookup(a[::-1])
    assert keys2 == keys[::-1]
    np.testing.assert_array_equal(found[0][:, 0], [1, 0])
    assert cache.hits == 2 and cache.misses == 2


@pytest.mark.heavy
def test_embedding_cache_gives_the_same_losses(tmp_path, cache_dir, data_root):
    common = ("--config.max_steps=6", "--config.checkpoint.every_steps=6", "--config.data.augment=False")
    off = run_train(TINY1, tmp_path / "off", cache_dir, data_root, *common)
    assert off.returncode == 0, off.stderr[-4000:]
    on = run_train(TINY1, tmp_path / "on", cache_dir, data_root, *common, "--config.cache_embeddings=True")
    assert on.returncode == 0, on.stderr[-4000:]
    a, b = losses_of(tmp_path / "off"), losses_of(tmp_path / "on")
    assert b[6]["cache_hits"] >= 4  # the second epoch (steps 5, 6) is served from the cache
    for s in a:
        np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5, err_msg=f"step {s}")
