"""train.py's workdir: only a training workdir of ours is used, a resume may not change the run (it may change how
it is watched), metrics.jsonl never holds two copies of a step, a run that cannot start leaves no workdir."""

import json
import os
import struct
import subprocess

import pytest

from pisam_jax.training import logging as log_lib
from pisam_jax.training import workdirs
from pisam_jax.training.checkpoints import CheckpointError
from tests.test_train_loop import REPO, TINY1, _args, _env, ckpt_steps, losses_of

CONFIG = {  # the shape of a training config (configs/common.py), values arbitrary
    "stage": 1, "seed": 0, "learning_rate": 0.001, "max_steps": 10, "log_every_steps": 5, "progress": True,
    "model": {"model_type": "vit_b", "image_size": 256},
    "data": {"datasets": "DIS5K-TR", "data_root": "/data", "threads": 2, "workers": 0},
    "checkpoint": {"every_steps": 5, "keep": 2},
}


def edited(**changes):
    """CONFIG with fields changed, nested ones spelt with "__" (data__threads=4); a value of None removes one."""
    c = json.loads(json.dumps(CONFIG))
    for field, value in changes.items():
        *parents, leaf = field.split("__")
        d = c
        for p in parents:
            d = d.setdefault(p, {})
        if value is None:
            del d[leaf]
        else:
            d[leaf] = value
    return c


def fake_checkpoint(workdir, step, config):
    """What check_resume reads of a checkpoint: checkpoints/<step>/meta/ with the run's config."""
    meta = workdir / "checkpoints" / str(step) / "meta"
    meta.mkdir(parents=True)
    (meta / "metadata").write_text(json.dumps({"step": step, "stage": config["stage"], "config": config}))


def test_only_our_workdirs_are_used(tmp_path):
    workdirs.check_ours(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    workdirs.check_ours(tmp_path / "empty")

    model = tmp_path / "model"  # a converted model: config.json + params/
    (model / "params").mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"format_version": 1, "model_type": "vit_b"}))
    with pytest.raises(CheckpointError, match="is a model directory; a run would overwrite its config.json"):
        workdirs.check_ours(model)
    users = tmp_path / "users"
    users.mkdir()
    for n in ("a.txt", "b", "c", "d"):
        (users / n).write_text("")
    with pytest.raises(CheckpointError, match=r"is not a training workdir \(it holds a.txt, b, c, ...\)"):
        workdirs.check_ours(users)
    (users / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a config.json that is not a training configuration"):
        workdirs.check_ours(users)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="is a file"):
        workdirs.check_ours(tmp_path / "file")

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)  # killed before it wrote its config.json (earlier versions)
    (run / "metrics.jsonl").write_text("")
    workdirs.check_ours(run)
    (run / "notes.md").write_text("")
    with pytest.raises(CheckpointError, match="notes.md"):
        workdirs.check_ours(run)
    (run / "config.json").write_text(json.dumps(CONFIG))  # a run's config marks it as ours, notes and all
    workdirs.check_ours(run)
    (run / "export").mkdir()
    with pytest.raises(CheckpointError, match="export is not a model directory"):
        workdirs.check_export(run)


def test_config_changes_are_classified_over_every_field():
    safe, unsafe = workdirs.config_changes(CONFIG, edited(
        log_every_steps=1, progress=False, max_steps=20, checkpoint__keep=5, data__threads=8, data__data_root="/mnt"))
    assert unsafe == []
    assert safe == ["checkpoint.keep: 2 -> 5", "data.data_root: /data -> /mnt", "data.threads: 2 -> 8",
                    "log_every_steps: 5 -> 1", "max_steps: 10 -> 20", "progress: True -> False"]
    safe, unsafe = workdirs.config_changes(CONFIG, edited(
        learning_rate=0.01, seed=1, model__image_size=1024, data__workers=2, data__datasets="paper-train"))
    assert safe == [] and unsafe == ["data.datasets: DIS5K-TR -> paper-train", "data.workers: 0 -> 2",
                                     "learning_rate: 0.001 -> 0.01", "model.image_size: 256 -> 1024", "seed: 0 -> 1"]
    # fields no list here knows of (a new stage's settings), added or removed: run-changing
    _, unsafe = workdirs.config_changes(CONFIG, edited(hq__learning_rate=0.1, seed=None))
    assert unsafe == ["hq.learning_rate: (absent) -> 0.1", "seed: 0 -> (absent)"]
    _, unsafe = workdirs.config_changes(CONFIG, edited(stage="sam"))
    assert unsafe == ["stage: 1 -> sam"]


def test_resume_refuses_run_changing_fields_and_prints_safe_ones(tmp_path, capsys):
    run = tmp_path / "run"
    assert workdirs.prepare(run, CONFIG, write=True) is None  # fresh: the run's config written first
    assert json.loads((run / "config.json").read_text()) == CONFIG
    fake_checkpoint(run, 4, CONFIG)
    with pytest.raises(CheckpointError, match=r"holds a run \(step 4\) made with another configuration: "
                                              r"learning_rate: 0.001 -> 0.002; seed: 0 -> 3. Resuming would mix"):
        workdirs.prepare(run, edited(learning_rate=0.002, seed=3, log_every_steps=1), write=True)
    capsys.readouterr()
    assert workdirs.prepare(run, edited(log_every_steps=1), write=True) == 4
    assert "from step 4 with changes that do not alter the run: log_every_steps: 5 -> 1" in capsys.readouterr().out
    assert workdirs.prepare(run, CONFIG, write=False) == 4


def test_remove_if_unused_removes_only_a_workdir_without_checkpoints(tmp_path):
    run = tmp_path / "run"
    workdirs.prepare(run, CONFIG, write=True)
    (run / "tensorboard").mkdir()
    assert workdirs.remove_if_unused(run) and not run.exists()
    workdirs.prepare(run, CONFIG, write=True)
    (run / "mine.txt").write_text("")
    assert not workdirs.remove_if_unused(run) and run.exists()
    (run / "mine.txt").unlink()
    assert workdirs.remove_if_unused(run, keep_folder=True) and os.listdir(run) == []  # it was made empty by the user
    workdirs.prepare(run, CONFIG, write=True)
    fake_checkpoint(run, 2, CONFIG)
    assert not workdirs.remove_if_unused(run) and run.exists()


def _session_starts(logdir):
    """Steps of the SessionLog START events (TensorBoard's purge marks) in the event files under ``logdir``."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps.append(event.step)
    return steps


@pytest.mark.parametrize("start, kept", [(0, []), (2, [1, 2])])
def test_metrics_are_cut_back_to_the_start(tmp_path, start, kept):
    w = log_lib.MetricWriter(tmp_path)
    for s in (1, 2, 3):
        w.write(s, {"loss": float(s)})
    w.close()
    w = log_lib.MetricWriter(tmp_path)
    w.truncate_after(start)  # a fresh start (0) or a resume from step 2
    assert [r["step"] for r in log_lib.read_jsonl(tmp_path / "metrics.jsonl")] == kept
    w.write(start + 1, {"loss": 9.0})
    w.close()
    assert [r["step"] for r in log_lib.read_jsonl(tmp_path / "metrics.jsonl")] == kept + [start + 1]
    assert _session_starts(tmp_path / "tensorboard") == [start + 1]  # TensorBoard drops the old steps > start


# -- train.py as a user runs it ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """train.py on the tiny recipe in a subprocess; the runs of this module share a compilation cache."""
    cache = str(tmp_path_factory.mktemp("workdir_xla"))

    def run(workdir, data_root, *extra):
        return subprocess.run(_args(TINY1, workdir, cache, data_root, *extra), cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=600)

    return run


def error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from pisam_jax.data import synthetic

    root = tmp_path_factory.mktemp("workdir_data")
    synthetic.generate(str(root / "DIS5K" / "DIS-TR"), 4, size=256, seed=0, progress=False)
    return str(root)


def test_train_refuses_a_model_directory_as_workdir(tiny_sam, data_root, train):
    before = (tiny_sam[2] / "config.json").read_bytes()
    line = error_line(train(tiny_sam[2], data_root))
    assert "is a model directory" in line and "--config.init_from" in line
    assert (tiny_sam[2] / "config.json").read_bytes() == before


def test_train_refuses_a_resume_with_another_learning_rate(tmp_path, data_root, train):
    from configs import tiny

    run = tmp_path / "run"
    config = json.loads(tiny.get_config("stage1").to_json_best_effort())
    config.update(data=dict(config["data"], data_root=data_root), progress=False, log_every_steps=1)
    fake_checkpoint(run, 2, config)
    line = error_line(train(run, data_root, "--config.learning_rate=0.01"))
    assert "learning_rate: 0.001 -> 0.01" in line and "Resuming would mix two runs" in line
    assert ckpt_steps(run) == [2] and sorted(os.listdir(run)) == ["checkpoints"]


def test_a_run_that_cannot_start_leaves_no_workdir(tmp_path, data_root, train):
    line = error_line(train(tmp_path / "new", data_root, "--config.init_from=/no/such/sam"))
    assert "/no/such/sam" in line and not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # made by the user: stays, empty
    error_line(train(tmp_path / "empty", data_root, "--config.init_from=/no/such/sam"))
    assert os.listdir(tmp_path / "empty") == []


def test_restart_before_the_first_checkpoint_does_not_repeat_steps(tmp_path, data_root, train):
    """A run killed before its first checkpoint left steps 1-3 in metrics.jsonl; the rerun starts afresh and
    metrics.jsonl holds each step once. Then a resume that changes only the logging is allowed and says so."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": 1}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    common = ("--config.max_steps=2", "--config.checkpoint.every_steps=2", "--config.log_images_every=0")
    proc = train(run, data_root, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses_of(run)) == [1, 2] and len(log_lib.read_jsonl(run / "metrics.jsonl")) == 2
    assert json.loads((run / "config.json").read_text())["max_steps"] == 2  # the fresh start's config

    again = train(run, data_root, *common, "--config.log_every_steps=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "with changes that do not alter the run: log_every_steps: 1 -> 2" in again.stdout
    assert sorted(losses_of(run)) == [1, 2]

    # The export of this workdir never lands on the workdir, never replaces anything but a model directory
    from pisam_jax import models
    from pisam_jax.training import checkpoints
    from tests.test_cli_errors import fingerprint

    before = fingerprint(run)
    assert checkpoints.main([str(run), str(run)]) == 2
    assert checkpoints.main([str(run), str(run / "checkpoints" / "new")]) == 2
    assert checkpoints.main([str(run), str(run / "export")]) == 2  # exists: --overwrite needed
    assert fingerprint(run) == before
    assert checkpoints.main([str(run), str(run / "export"), "--overwrite"]) == 0
    after = fingerprint(run)
    assert {k: v for k, v in after.items() if not k.startswith("export")} == {
        k: v for k, v in before.items() if not k.startswith("export")}
    assert models.read_config(run / "export").provenance["step"] == 2 and sorted(os.listdir(run / "export")) == [
        "config.json", "params"]
