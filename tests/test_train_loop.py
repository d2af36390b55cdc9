"""End-to-end training with ``train.py`` on the tiny recipe (configs/tiny.py): stage 1 -> stage 2, the export
loads, frozen parameters stay bit-identical, sample predictions in TensorBoard, the NaN guard, user errors; the SAM
and HQ-SAM stages train and repeat themselves; and the numbers are the same whatever happens to the run: resume
after SIGKILL and two processes with ``jax.distributed`` give bit-identical losses and parameters (both Pi-SAM
stages), 8 devices equal 1 device to float rounding. The stage-2 training inputs are checked against the spec-6
oracle (tests/stage2_oracle.py).

Every run is a subprocess (as a user runs it). They share one persistent XLA compilation cache, so only the
first run of a kind pays for compiling the model. The reference runs of the Pi-SAM stages use two devices in one
process, so that a two-process run (one device each) runs the same partitioned program.
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
    """8 synthetic images, their structures drawn thick (``detail``): stage 2 simulates clicks on the 64^2 grid
    of the tiny model from error regions that survive a 1 px erosion; at the default detail nearly none does,
    every sample is invalid and stage 2 would train nothing (measured after 6 stage-1 steps from random weights:
    0 of 12 samples valid at detail 1, 4 of 12 at detail 12; from ``stage1_run``, 8 of 12)."""
    from pisam_jax.data import synthetic

    root = tmp_path_factory.mktemp("tiny_data")
    synthetic.generate(str(root / "DIS5K" / "DIS-TR"), 8, size=384, seed=0, progress=False, detail=12)
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


TIMINGS = {"step_time", "data_time", "images_per_s", "prepare_fraction", "cache_hits"}


def assert_same_numbers(got, want):
    """Every training number of every step (the loss, its terms, gradient norm, learning rate, valid fraction)
    bit-identical; not the timings."""
    assert sorted(got) == sorted(want)
    for s in want:
        keys = set(want[s]) - TIMINGS
        assert set(got[s]) - TIMINGS == keys
        for k in keys:
            assert got[s][k] == want[s][k], f"step {s} {k}: {got[s][k]!r} != {want[s][k]!r}"


def variables(path) -> dict[str, np.ndarray]:
    """Every variable of the model in an export (or model directory) or in a workdir's latest checkpoint."""
    from flax import nnx

    from pisam_jax import load_model
    from pisam_jax.training.checkpoints import is_workdir, load_workdir_model

    model = load_workdir_model(path)[0] if is_workdir(path) else load_model(path)
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.state(model, nnx.Variable).flat_state()}


def assert_same_variables(got, want):
    assert got.keys() == want.keys()
    differ = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} variables differ, e.g. {differ[:3]}"


def assert_only_trained_moved(start, end, trained):
    """Every variable of ``start`` (the model a run began from) that is not under a ``trained`` module is
    bit-identical in ``end``; returns how many trained ones moved."""
    under = lambda k: any(k == m or k.startswith(m + ".") for m in trained)  # noqa: E731
    assert set(start) <= set(end)
    frozen = [k for k in start if not under(k)]
    assert frozen, "nothing frozen to check"
    changed = [k for k in frozen if not np.array_equal(start[k], end[k])]
    assert not changed, f"frozen variables changed: {changed[:5]}"
    return sum(not np.array_equal(start[k], end[k]) for k in start if under(k))


def ckpt_steps(workdir):
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


STAGE1_ARGS = ("--config.max_steps=6", "--config.checkpoint.every_steps=2")
# stage 2 at batch 4: two samples a process in the two-process run; about a third of the samples get clicks
STAGE2_ARGS = ("--config.max_steps=6", "--config.checkpoint.every_steps=2", "--config.batch_size=4")


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory, cache_dir, data_root, tiny_sam):
    """An uninterrupted 6-step stage-1 run from a converted (tiny, random) SAM on two devices, checkpoints every 2
    steps, sample predictions of 2 images every 3 steps (the SIGKILL and two-process runs go without them: they
    must not change training)."""
    workdir = tmp_path_factory.mktemp("stage1") / "run"
    proc = run_train(TINY1, workdir, cache_dir, data_root, *STAGE1_ARGS, f"--config.init_from={tiny_sam[2]}",
                     "--config.log_images_every=3", "--config.log_images_count=2", devices=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


@pytest.fixture(scope="session")
def stage2_run(tmp_path_factory, cache_dir, data_root, stage1_run):
    """An uninterrupted 6-step stage-2 run from ``stage1_run`` on two devices, sample predictions every 3 steps."""
    workdir = tmp_path_factory.mktemp("stage2") / "run"
    proc = run_train(TINY2, workdir, cache_dir, data_root, *STAGE2_ARGS, f"--config.init_from={stage1_run}",
                     "--config.log_images_every=3", devices=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


def test_stage1_runs_checkpoints_and_exports(stage1_run, tiny_sam):
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
    # SAM's weights came from init_from and stayed frozen, bit for bit; the Pi-SAM modules are new
    sam, pi = variables(tiny_sam[2]), variables(stage1_run / "export")
    assert set(sam) < set(pi)
    assert_only_trained_moved(sam, pi, [])


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
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sigkill_and_resume_repeats_the_uninterrupted_run(stage, request, tmp_path, cache_dir, data_root):
    """Killed once its step-2 checkpoint exists, then resumed: the losses of every step and the final parameters
    are bit-identical to the uninterrupted run's (the same program, the restored state, optimiser and data
    position, and the stage-2 clicks seeded by step)."""
    reference = request.getfixturevalue(f"{stage}_run")
    if stage == "stage1":
        config, args = TINY1, (*STAGE1_ARGS, f"--config.init_from={request.getfixturevalue('tiny_sam')[2]}")
    else:
        config, args = TINY2, (*STAGE2_ARGS, f"--config.init_from={request.getfixturevalue('stage1_run')}")
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_args(config, workdir, cache_dir, data_root, *args), cwd=REPO, env=_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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

    resumed = run_train(config, workdir, cache_dir, data_root, *args, devices=2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(resumed)" in resumed.stdout
    want, got = losses_of(reference), losses_of(workdir)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert_same_numbers(got, want)
    assert_same_variables(variables(workdir / "export"), variables(reference / "export"))


@pytest.mark.heavy
def test_stage2_from_stage1_workdir(stage1_run, stage2_run):
    records = losses_of(stage2_run)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    from tests.test_train_samples import read_images

    assert sorted(read_images(stage2_run / "tensorboard")) == [  # tiny: 2 samples
        ("samples/0", 3), ("samples/0", 6), ("samples/1", 3), ("samples/1", 6)]
    assert {"bce_1024", "dice_1024", "valid_fraction", "prepare_fraction"} <= set(records[2])
    # it trains: some samples get clicks (the data are drawn thick enough, see data_root), gradients flow
    assert sum(r["valid_fraction"] > 0 and r["grad_norm"] > 0 for r in records.values()) >= 3
    exported = variables(stage2_run / "export")
    from pisam_jax import load_model

    assert load_model(stage2_run / "export").config.interactor
    # everything but interact_2's parameters is the stage-1 model, bit for bit
    stage1 = variables(stage1_run)
    assert all(k.startswith("mask_decoder.interact_2.") for k in set(exported) - set(stage1))
    assert_only_trained_moved(stage1, exported, ["mask_decoder.interact_2"])


@pytest.mark.heavy
def test_stage2_training_inputs_match_the_spec_oracle(stage1_run, tmp_path, cache_dir, data_root):
    """What the loop feeds the jitted stage-2 step, captured by spies (tests/stage2_oracle.py): Stage2.prepare's
    output, the interactor's points / flags / padding mask, the weights in the loss, on the synthetic data's masks
    and the low-resolution predictions of the trained stage-1 model, checked against the spec-6 oracle."""
    from tests import stage2_oracle as oracle

    out = tmp_path / "seen.npz"
    args = _args(TINY2, tmp_path / "w", cache_dir, data_root, f"--config.init_from={stage1_run}",
                 "--config.max_steps=3", "--config.batch_size=4", "--config.checkpoint.every_steps=3",
                 "--config.log_images_every=0")
    proc = subprocess.run([sys.executable, "-m", "tests.stage2_oracle", str(out), *args[2:]], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = dict(np.load(out))
    assert seen["valid"].shape == (12,) and seen["low_res"].shape == (12, 64, 64)  # 3 steps x 4 rows, 64^2
    ks, ns = [], []
    for i in range(12):
        low = oracle.on_click_grid(seen["low_res"][i])  # 64^2 -> the 256^2 click grid
        comps = oracle.error_components(low, oracle.labels_low(seen["mask"][i], low.shape))
        r = oracle.check_sample(comps, seen["points"][i], seen["labels"][i], seen["valid"][i])
        ks.append(r["k"])
        ns.append(r["n"])
        assert seen["has_object"][i] == (seen["mask"][i] > 128).any()
    # the model gets them as they are: flags 1 / 0, padding masked (D5); the loss weighs valid x has_object
    np.testing.assert_array_equal(seen["model_points"], seen["points"])
    np.testing.assert_array_equal(seen["model_flags"], np.maximum(seen["labels"], 0))
    np.testing.assert_array_equal(seen["model_pad"], seen["labels"] < 0)
    oracle_valid = np.array([k > 0 for k in ks])
    np.testing.assert_array_equal(seen["loss_weights"], (oracle_valid & seen["has_object"]).astype(np.float32))
    # not vacuous: clicks of both kinds, several in one sample (on the 256^2 click grid every sample here has a
    # click; the invalid case is in test_train_stage2_oracle.py)
    assert oracle_valid.sum() > 0 and max(ns) > 1
    flags = seen["labels"][seen["labels"] >= 0]
    assert (flags == 1).any() and (flags == 0).any()


@pytest.mark.heavy
@pytest.mark.parametrize("stage", ["sam", "hq"])
def test_sam_and_hq_stages_train_and_repeat(stage, tmp_path, cache_dir, data_root, tiny_sam):
    """The SAM stage fine-tuning a converted SAM's mask decoder (SAM-paper prompts: two click rounds and a mask
    round here) and the HQ-SAM stage on it, through train.py: they train (finite losses, gradients), export a
    loadable model whose frozen parameters are the converted SAM's bit for bit, and a second run with the same
    seed gives the same numbers and parameters."""
    extra = (f"--config.stage={stage}", "--config.max_steps=2", "--config.checkpoint.every_steps=2",
             f"--config.init_from={tiny_sam[2]}", "--config.log_images_every=0")
    if stage == "sam":
        extra += ("--config.train_modules=mask_decoder", "--config.sam.click_rounds=2", "--config.sam.mask_rounds=1")
    for name in ("a", "b"):
        proc = run_train(TINY1, tmp_path / name, cache_dir, data_root, *extra)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"{stage}: training" in proc.stdout
    a, b = losses_of(tmp_path / "a"), losses_of(tmp_path / "b")
    terms = {"sam": {"focal", "dice", "iou_mse", "iou_first", "iou_last"}, "hq": {"bce", "dice"}}[stage]
    assert sorted(a) == [1, 2]
    for r in a.values():
        assert terms | {"loss", "grad_norm", "learning_rate"} <= set(r)
        assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert_same_numbers(b, a)
    exported = variables(tmp_path / "a" / "export")
    assert_same_variables(variables(tmp_path / "b" / "export"), exported)
    from pisam_jax import load_model
    from pisam_jax.training.trainable import TRAINABLE

    assert load_model(tmp_path / "a" / "export").config.decoder == stage
    trained = ["mask_decoder"] if stage == "sam" else list(TRAINABLE["hq"])
    moved = assert_only_trained_moved(variables(tiny_sam[2]), exported, trained)
    if stage == "sam":  # the decoder's parameters came from the converted SAM and moved
        assert moved > 0
    else:  # HQ-SAM's new modules are in the export
        assert any(k.startswith("mask_decoder.hf_token") for k in exported)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir, data_root):
    workdir = tmp_path / "nan"
    proc = run_train(TINY1, workdir, cache_dir, data_root, "--config.max_steps=6",
                     "--config.checkpoint.every_steps=2", "--config.debug.nan_at_step=2")  # step index 2 = step 3
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "diverged" in last and "loss=nan" in last and "step 2" in last, last
    assert ckpt_steps(workdir) == [2]
    assert sorted(losses_of(workdir)) == [1, 2]


def test_bfloat16_training_tracks_float32(stage1_run, tiny_sam, tmp_path, cache_dir, data_root):
    """``config.dtype=bfloat16``: the same run as ``stage1_run`` (same start, same batches) computes in bf16, and
    its checkpoints and export keep float32 weights. The first step's loss (same weights, same
    batch: only the compute dtype differs) differs, and by less than one bf16 rounding (2^-9 relative): each
    operand is rounded to 8 significant bits with float32 accumulation, and the loss, a mean over thousands of
    pixels, averages the independent roundings down (measured 4.3e-4 here)."""
    from pisam_jax import load_model

    workdir = tmp_path / "bf16"
    proc = run_train(TINY1, workdir, cache_dir, data_root, *STAGE1_ARGS, f"--config.init_from={tiny_sam[2]}",
                     "--config.dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-4000:]
    bf16, fp32 = losses_of(workdir), losses_of(stage1_run)
    assert sorted(bf16) == sorted(fp32) and all(np.isfinite(r["loss"]) for r in bf16.values())
    first = abs(bf16[1]["loss"] - fp32[1]["loss"]) / abs(fp32[1]["loss"])
    assert 0 < first <= 2.0**-9, (bf16[1]["loss"], fp32[1]["loss"])
    model = load_model(workdir / "export")
    assert model.compute_dtype == "float32"  # the dtype is chosen at load time, not stored
    assert {v.dtype for v in variables(workdir / "export").values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--config.dtype=float16"], "config.dtype: unknown compute dtype 'float16'"),
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


def run_two_processes(config, workdir, cache_dir, data_root, *extra):
    """Two processes of one ``jax.distributed`` run (one CPU device each) -> their (stdout, stderr)."""
    port = _free_port()
    procs = []
    for i in range(2):
        args = _args(config, workdir, cache_dir, data_root, *extra, "--config.distributed=True",
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
    return outs


@pytest.mark.heavy
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_two_processes_equal_one_process(stage, request, tmp_path, cache_dir, data_root):
    """Two processes, each reading its rows of the global batches (data.pipeline) and simulating the clicks of
    its rows (seeded by global row), train exactly as one process does on the same global batch: every loss and
    every parameter bit-identical to the uninterrupted reference run (one process, two devices: the same
    partitioned program). Stage 1 also logs sample panels (once, from process 0) and exports afterwards."""
    reference = request.getfixturevalue(f"{stage}_run")
    workdir = tmp_path / "multi"
    if stage == "stage1":
        extra = (*STAGE1_ARGS, f"--config.init_from={request.getfixturevalue('tiny_sam')[2]}",
                 "--config.log_images_every=2", "--config.log_images_count=1")  # 1 sample, padded to 2 rows
    else:
        extra = (*STAGE2_ARGS, f"--config.init_from={request.getfixturevalue('stage1_run')}",
                 "--config.log_images_every=0")
    outs = run_two_processes(TINY1 if stage == "stage1" else TINY2, workdir, cache_dir, data_root, *extra)
    assert "2 processes" in outs[0][0]
    assert ckpt_steps(workdir) == [4, 6]
    data_files = sorted(f.name for f in (workdir / "checkpoints" / "6" / "data").iterdir())
    assert any("process_0" in f for f in data_files) and any("process_1" in f for f in data_files), data_files
    assert_same_numbers(losses_of(workdir), losses_of(reference))  # process 0 writes the metrics
    assert_same_variables(variables(workdir), variables(reference / "export"))
    assert not (workdir / "export").exists()  # multi-host: export afterwards with the checkpoints module
    if stage == "stage2":
        return
    from tests.test_train_samples import read_images

    assert sorted(read_images(workdir / "tensorboard")) == [("samples/0", 2), ("samples/0", 4), ("samples/0", 6)]
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
