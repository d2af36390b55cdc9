"""Every command, every kind of bad input, as a user runs them: exit status 2, one line on stderr that names the
problem (no traceback, no library noise), and nothing created, changed or deleted anywhere in the user's files.

One shared folder of inputs (models, images, a dataset, a workdir, a folder and a file of the user's) is
fingerprinted before and after each command; any difference fails the case. The absl commands (eval.py, train.py,
the converters) run as subprocesses; the others are called in this process through their ``main(argv)`` (seconds
saved a case), except a few cases that show the real command line prints nothing more at exit either."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tiny_sam, tmp_path_factory):
    """The inputs, under one folder W. Names used by the cases below."""
    from pisam_jax.data import synthetic

    w = tmp_path_factory.mktemp("world")
    shutil.copy(tiny_sam[1], w / "sam.pth")
    shutil.copytree(tiny_sam[2], w / "sam")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)).save(w / "img.png")
    (w / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (w / "corrupt.pth").write_bytes(b"PK\x03\x04 not a zip")
    shutil.copytree(tiny_sam[2], w / "wide")  # config.json edited to another width
    config = json.loads((w / "wide" / "config.json").read_text())
    (w / "wide" / "config.json").write_text(json.dumps(dict(config, encoder_embed_dim=128)))
    shutil.copytree(tiny_sam[2], w / "damaged")  # a parameter file cut short
    biggest = max((p for p in (w / "damaged" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100_000])
    (w / "mine").mkdir()  # a folder of the user's
    (w / "mine" / "thesis.tex").write_text("years of work")
    (w / "file.txt").write_text("a file of the user's")
    (w / "out.png").write_bytes(b"an earlier output")
    run = w / "run" / "checkpoints" / "2" / "meta"  # a workdir with a checkpoint (its meta is what is read first)
    run.mkdir(parents=True)
    (run / "metadata").write_text(json.dumps({"step": 2, "stage": 1, "config": {"stage": 1}}))
    (w / "run" / "config.json").write_text(json.dumps({"stage": 1}))
    for name in ("DIS-VD", "DIS-TR"):
        synthetic.generate(str(w / "data" / "DIS5K" / name), 2, size=128, seed=0, progress=False)
    return w


def fingerprint(root: Path) -> dict[str, str]:
    """{relative path: sha256 of the content (files) or "dir"} of everything under ``root``."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


PREDICT = ["predict.py", "--model", "{W}/sam", "--image", "{W}/img.png", "--box", "10", "20", "150", "110",
           "--out", "{W}/new.png"]
EVAL = ["eval.py", "--model", "{W}/sam", "--data_root", "{W}/data", "--datasets", "DIS5K-VD", "--out", "{W}/results",
        "--noprogress"]
TRAIN = ["train.py", "--config=configs/tiny.py:stage1", "--workdir={W}/new_run", "--config.data.data_root={W}/data",
         "--config.progress=False", "--compilation_cache="]
CONVERT = ["-m", "convert.sam", "--checkpoint", "{W}/sam.pth", "--out", "{W}/converted"]
EXPORT = ["-m", "pisam_jax.training.checkpoints", "{W}/run", "{W}/exported"]
IN_PROCESS = {"predict.py": "predict", "pisam_jax.training.checkpoints": "pisam_jax.training.checkpoints",
              "pisam_jax.data.synthetic": "pisam_jax.data.synthetic"}
AS_SUBPROCESS = {"predict params damaged", "predict bad flag", "export onto the workdir"}  # the real command lines


def with_(base, **changes):
    """``base`` with the values of some flags replaced (``out="x"`` -> ``--out x``), or appended."""
    args = list(base)
    for flag, value in changes.items():
        flag = "--" + flag
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


CASES = {
    # predict.py: inputs, prompts, outputs, flags; all before the model is loaded, unless the model is the problem
    "predict image missing": (with_(PREDICT, image="{W}/missing.png"), "missing.png: file not found"),
    "predict image corrupt": (with_(PREDICT, image="{W}/corrupt.png"), "corrupt.png: cannot decode"),
    "predict model is a .pth": (with_(PREDICT, model="{W}/sam.pth"), "is a PyTorch checkpoint file; convert it"),
    "predict model missing": (with_(PREDICT, model="{W}/nothing"), "does not exist; convert a checkpoint first"),
    "predict config edited": (with_(PREDICT, model="{W}/wide"), "config.json does not match the parameters"),
    "predict params damaged": (with_(PREDICT, model="{W}/damaged"), "cannot read the parameters"),
    "predict box outside": (PREDICT[:5] + ["--box", "10", "20", "170", "110", "--out", "{W}/new.png"],
                            "lies outside the 160x120 image"),
    "predict box inverted": (PREDICT[:5] + ["--box", "150", "20", "10", "110", "--out", "{W}/new.png"], "inverted"),
    "predict box nan": (PREDICT[:5] + ["--box", "nan", "20", "150", "110", "--out", "{W}/new.png"], "finite"),
    "predict point outside": (PREDICT + ["--point", "500", "50", "1"], "--point 500 50 lies outside the 160x120"),
    "predict click on SAM": (PREDICT + ["--click", "50", "50", "fg"], "--click needs a Pi-SAM model"),
    "predict out exists": (with_(PREDICT, out="{W}/out.png"), "already exists; choose another name, or"),
    "predict out is a folder": (with_(PREDICT, out="{W}/mine.png"), None),  # made a folder below
    "predict out unwritable": (with_(PREDICT, out="/proc/m.png"), "cannot write in /proc"),
    "predict overlay unwritable": (with_(PREDICT, overlay="/proc/pisam/o.png"), "--overlay /proc/pisam/o.png"),
    "predict bad flag": (PREDICT[:5] + ["--box", "1", "2", "3"], "argument --box: expected 4 arguments"),
    # the order of the checks: a box or image mistake is reported, not the (damaged) model behind it
    "predict box before model": (with_(PREDICT, model="{W}/damaged")[:5] + ["--box", "0", "0", "500", "50", "--out",
                                 "{W}/new.png"], "lies outside the 160x120 image"),
    "predict image before model": (with_(PREDICT, model="{W}/damaged", image="{W}/corrupt.png"), "cannot decode"),
    # eval.py
    "eval out is a file": (with_(EVAL, out="{W}/file.txt"), "is a file; give a folder"),
    "eval out is the user's": (with_(EVAL, out="{W}/mine"), "holds other files (thesis.tex), not an earlier"),
    "eval out unwritable": (with_(EVAL, out="/proc/pisam/results"), "cannot write in /proc"),
    "eval model is a .pth": (with_(EVAL, model="{W}/sam.pth"), "is a PyTorch checkpoint file"),
    "eval config edited": (with_(EVAL, model="{W}/wide"), "config.json does not match the parameters"),
    "eval unknown dataset": (with_(EVAL, datasets="DIS5K-XX"), "unknown dataset 'DIS5K-XX'"),
    "eval dataset missing": (with_(EVAL, model="{W}/damaged", datasets="DIS5K-TE2"),  # before the model loads
                             "image folder of dataset DIS5K-TE2 not found"),
    "eval unknown flag": (EVAL + ["--nope"], "Unknown command line flag 'nope'"),
    # train.py
    "train config missing": ([TRAIN[0], "--config=configs/nope.py"] + TRAIN[2:], "--config configs/nope.py: [Errno 2]"),
    "train recipe argument": ([TRAIN[0], "--config=configs/tiny.py:stage3"] + TRAIN[2:],
                              "configs/tiny.py takes stage1 or stage2, not 'stage3'"),
    "train bad value": (TRAIN + ["--config.learning_rate=abc"], "could not convert string to float: 'abc'"),
    "train unknown field": (TRAIN + ["--config.no_such_field=1"], "no config field 'no_such_field'"),
    "train workdir is a model": ([*TRAIN[:2], "--workdir={W}/sam", *TRAIN[3:]], "is a model directory"),
    "train workdir resumed otherwise": ([*TRAIN[:2], "--workdir={W}/run", *TRAIN[3:]], "made with another config"),
    "train init_from missing": (TRAIN + ["--config.init_from={W}/nothing"], "config.init_from {W}/nothing"),
    # the converters
    "convert out exists": (with_(CONVERT, out="{W}/sam"), "already exists; choose another --out, or pass --overwrite"),
    "convert overwrite the user's": (with_(CONVERT, out="{W}/mine") + ["--overwrite"],
                                     "not a pisam-jax model directory; --overwrite replaces only model directories"),
    "convert out under a file": (with_(CONVERT, out="{W}/file.txt/m"), "file.txt is a file, not a folder"),
    "convert out unwritable": (with_(CONVERT, out="/proc/pisam/m"), "cannot write in /proc"),
    "convert checkpoint missing": (with_(CONVERT, checkpoint="{W}/nothing.pth"), "nothing.pth does not exist"),
    "convert checkpoint corrupt": (with_(CONVERT, checkpoint="{W}/corrupt.pth"), "is not a readable PyTorch"),
    "convert --model-type": (CONVERT + ["--model-type", "vit_b"], "holds a custom model but --model-type says vit_b"),
    "convert unknown flag": (CONVERT + ["--nope"], "Unknown command line flag 'nope'"),
    "convert.hq_sam SAM file": (["-m", "convert.hq_sam", *CONVERT[2:]], "is a SAM checkpoint, not HQ-SAM"),
    "convert.pisam not a decoder": (["-m", "convert.pisam", "--sam-checkpoint", "{W}/sam.pth", "--pisam-checkpoint",
                                     "{W}/sam.pth", "--out", "{W}/pi"], "looks like a whole SAM / HQ-SAM model"),
    # the export of a workdir: never onto the workdir, never onto anything but a model directory
    "export onto the workdir": (EXPORT[:3] + ["{W}/run", "--overwrite"], "is the workdir being exported"),
    "export into its checkpoints": (EXPORT[:3] + ["{W}/run/checkpoints/3"], "lies in its checkpoints"),
    "export overwrite the user's": (EXPORT[:3] + ["{W}/mine", "--overwrite"], "not a pisam-jax model directory"),
    "export onto a file": (EXPORT[:3] + ["{W}/file.txt", "--overwrite"], "is a file; --overwrite replaces only"),
    "export out unwritable": (EXPORT[:3] + ["/proc/pisam/m"], "cannot write in /proc"),
    "export not a workdir": (EXPORT[:2] + ["{W}/mine", "{W}/exported"], "is not a training workdir"),
    "export step missing": (EXPORT + ["7"], "has no checkpoint of step 7; its steps: 2"),
    # the synthetic data generator
    "synthetic out under a file": (["-m", "pisam_jax.data.synthetic", "--out", "{W}/file.txt/d", "--n", "1"],
                                   "cannot write to {W}/file.txt/d"),
}


def run_command(argv, capsys, subprocess_only=False):
    """(exit status, stderr) of a command: in this process through its ``main(argv)``, or as a subprocess."""
    script = argv[1] if argv[0] == "-m" else argv[0]
    if script in IN_PROCESS and not subprocess_only:
        import importlib

        main = importlib.import_module(IN_PROCESS[script]).main
        capsys.readouterr()
        try:
            code = main(argv[2:] if argv[0] == "-m" else argv[1:])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(world, case, capsys):
    argv, message = CASES[case]
    if case == "predict out is a folder":
        (world / "mine.png").mkdir(exist_ok=True)
        message = "mine.png is a folder; give a file name"
    argv = [a.replace("{W}", str(world)) for a in argv]
    message = message.replace("{W}", str(world))
    before = fingerprint(world)
    code, stderr = run_command(argv, capsys, subprocess_only=case in AS_SUBPROCESS)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr[-3000:]
    assert fingerprint(world) == before, "the command created, changed or removed files"
