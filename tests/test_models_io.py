"""Our model directories: save_model never deletes what is not a model directory, replaces one atomically, cleans
up after a killed save; load_model refuses a config.json that does not match its parameters; the parameter
fingerprint that evaluation records."""

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from pisam_jax import models, outputs
from tests.test_outputs import dead_pid, modes


@pytest.fixture(scope="module")
def model(tiny_sam):
    return models.load_model(tiny_sam[2])


def other_weights(path):
    """The model at ``path`` with one weight changed (as a re-export of another step would have)."""
    model = models.load_model(path)
    kernel = model.mask_decoder.iou_prediction_head.layers[0].kernel
    changed = np.array(kernel.get_value())
    changed[0, 0] += np.float32(1e-6)  # one element, by about one part in a million
    kernel.set_value(changed)
    return model


def test_existing_output_needs_overwrite_and_is_never_a_users_folder(model, tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(models.ModelError, match="already exists; choose another --out, or pass --overwrite"):
        models.save_model(model, users)
    with pytest.raises(models.ModelError, match="not a pisam-jax model directory; --overwrite replaces only model"):
        models.save_model(model, users, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(models.ModelError, match="is a file"):
        models.save_model(model, tmp_path / "file", overwrite=True)

    # a model directory with a file of the user's in it is not replaced either
    models.save_model(model, tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(models.ModelError, match="not a pisam-jax model directory"):
        models.save_model(model, tmp_path / "m", overwrite=True)
    assert (users / "thesis.tex").read_text() == "years of work" and (tmp_path / "m" / "notes.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["file", "m", "mine"]  # no temporaries left by the refusals


def test_overwrite_replaces_a_model_directory(model, tmp_path):
    out = tmp_path / "m"
    models.save_model(model, out)
    before = json.loads((out / "config.json").read_text())
    changed = other_weights(out)
    models.save_model(changed, out, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # the old one moved aside and removed, no temporary left
    assert json.loads((out / "config.json").read_text()) == before
    assert models.params_fingerprint(models.load_model(out)) == models.params_fingerprint(changed)


def test_output_under_a_file_or_unwritable_is_refused_before_any_work(model, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(models.ModelError, match="f is a file, not a folder"):
        models.save_model(model, tmp_path / "f" / "m")
    with pytest.raises(models.ModelError, match="cannot write in /proc"):
        models.check_output_dir("/proc/pisam-test/m")
    models.save_model(model, tmp_path / "a" / "b" / "m")  # missing parents are made
    assert models.is_model_dir(tmp_path / "a" / "b" / "m")


def test_a_killed_save_is_cleaned_up_by_the_next(model, tmp_path):
    stale = tmp_path / f".m.tmp-{outputs._HOST}-{dead_pid()}-0123abcd"  # SIGKILL mid-write, this version
    legacy = tmp_path / ".m.tmp-k3j5h2l1"  # ... and the mkdtemp name of earlier versions
    for d in (stale, legacy):
        (d / "params").mkdir(parents=True)
        (d / "params" / "big").write_bytes(b"0" * 1000)
    models.save_model(model, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_saved_model_honours_the_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        models.save_model(model, tmp_path / "m")
    finally:
        os.umask(old)
    got = modes(tmp_path / "m")
    folders = {k: v for k, v in got.items() if stat.S_ISDIR(os.stat(tmp_path / "m" / k).st_mode)}
    assert set(folders.values()) == {0o750} and set(got.values()) == {0o750, 0o640}, got


@pytest.mark.parametrize("field, value", [("encoder_embed_dim", 128), ("encoder_depth", 3), ("window_size", 4),
                                          ("image_size", 512), ("decoder", "hq")])
def test_config_json_must_match_the_parameters(tiny_sam, tmp_path, field, value):
    d = tmp_path / "edited"
    shutil.copytree(tiny_sam[2], d)
    config = json.loads((d / "config.json").read_text())
    config[field] = value
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelError, match=r"edited/config.json does not match the parameters in .*edited/params "
                                                r"\(\d+ arrays differ; first: .*\); was config.json edited"):
        models.load_model(d)


def test_read_config_says_what_the_path_is(tiny_sam, tmp_path):
    with pytest.raises(models.ModelError, match=r"sam_tiny.pth is a PyTorch checkpoint file; convert it to a model "
                                                r"directory first \(python -m convert.sam --checkpoint .*sam_tiny.pth"):
        models.read_config(tiny_sam[1])
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(models.ModelError, match="is a training workdir, not a model directory; give its export"):
        models.read_config(tmp_path / "run")
    with pytest.raises(models.ModelError, match="does not exist; convert a checkpoint first"):
        models.read_config(tmp_path / "nothing")


def test_params_fingerprint_identifies_the_weights(tiny_sam, model, tmp_path):
    from convert.sam import convert_sam

    again = convert_sam(tiny_sam[1], tmp_path / "again")  # the same file converted again
    assert models.params_fingerprint(models.load_model(again)) == models.params_fingerprint(model)
    assert models.params_fingerprint(other_weights(again)) != models.params_fingerprint(model)
    assert len(models.params_fingerprint(model)) == 64


def test_a_terminated_conversion_removes_its_temporary(tiny_sam, tmp_path):
    """SIGTERM while the model is being written (a converter's run_cli): the temporary folder goes with it."""
    import signal
    import subprocess
    import sys

    script = f"""
import sys, time
from convert.checkpoint import run_cli
from pisam_jax import models, outputs
def stall(tmp, path):
    print("writing", flush=True)
    time.sleep(120)
outputs.replace_folder = stall  # the parameters and config.json are written; stop before the rename
def main(argv):
    models.save_model(models.load_model({str(tiny_sam[2])!r}), {str(tmp_path / "m")!r})
run_cli(main)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert [p.name.startswith(".m.tmp-") for p in tmp_path.iterdir()] == [True]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_parameter_file_is_one_error_and_nothing_on_stderr(tiny_sam, tmp_path):
    """A truncated parameter file: each load is one ModelError and nothing else, though orbax's other reads are
    still in flight when it fails (they used to print "Event loop is closed" tracebacks, about one load in five).
    A load that succeeds leaves the interpreter's hooks as they were."""
    import subprocess
    import sys

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_sam[2], damaged)
    biggest = max((p for p in (damaged / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100_000])
    script = f"""
import gc, sys
from pisam_jax import models
before = sys.unraisablehook
models.load_model({str(tiny_sam[2])!r})
assert sys.unraisablehook is before, "a load that succeeded left its hook"
errors = set()
for _ in range(20):
    try:
        models.load_model({str(damaged)!r})
    except models.ModelError as e:
        errors.add(str(e).split(":")[0])
gc.collect()
print(*errors, sep="\\n")
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"cannot read the parameters in {damaged / 'params'}"]
