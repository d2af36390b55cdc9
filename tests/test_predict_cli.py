"""predict.py as a user runs it: every image kind works, every mistake is one line and exit status 2."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import predict
from pisam_jax.overlay import BACKGROUND, FOREGROUND


def _write(path, array, **kwargs):
    Image.fromarray(array, **kwargs).save(path)
    return str(path)


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return {
        "rgb.jpg": _write(tmp_path / "rgb.jpg", rgb),
        "gray.png": _write(tmp_path / "gray.png", rgb[..., 0]),
        "rgba.png": _write(tmp_path / "rgba.png", np.dstack([rgb, np.full((120, 160), 128, np.uint8)])),
        "16bit.png": _write(tmp_path / "16bit.png", (rgb[..., 1].astype(np.uint16) * 257)),
    }


def _run(capsys, *argv):
    code = predict.main(list(argv))
    return code, capsys.readouterr()


@pytest.mark.parametrize("kind", ["rgb.jpg", "gray.png", "rgba.png", "16bit.png"])
def test_writes_mask_and_overlay(tiny_sam, images, tmp_path, capsys, kind):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code, io = _run(
        capsys, "--model", str(tiny_sam[2]), "--image", images[kind], "--box", "10", "20", "150", "110",
        "--point", "60", "60", "1", "--point", "140", "30", "0", "--out", str(out), "--overlay", str(overlay),
    )  # fmt: skip
    assert code == 0, io.err
    mask = np.asarray(Image.open(out))
    assert mask.shape == (120, 160) and set(np.unique(mask)) <= {0, 255}
    picture = np.asarray(Image.open(overlay))
    assert picture.shape == (120, 160, 3)
    assert tuple(picture[20, 80]) == (255, 215, 0), "the box outline is drawn"
    assert tuple(picture[60, 60]) == FOREGROUND, "the foreground click is drawn"
    assert tuple(picture[30, 140]) == BACKGROUND, "the background click is drawn"
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, overlay):  # readable by the team as any file the user writes: the umask decides
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_existing_outputs_need_overwrite(tiny_sam, images, tmp_path, capsys):
    out = tmp_path / "mask.png"
    out.write_bytes(b"earlier")
    argv = ["--model", str(tiny_sam[2]), "--image", images["rgb.jpg"], "--box", "10", "20", "150", "110",
            "--out", str(out)]
    code, io = _run(capsys, *argv)
    assert code == 2 and "already exists" in io.err and out.read_bytes() == b"earlier"
    code, io = _run(capsys, *argv, "--overwrite")
    assert code == 0, io.err
    assert np.asarray(Image.open(out)).shape == (120, 160)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image="missing.png"), "missing.png"),
        (dict(image="corrupt.png"), "corrupt.png"),
        (dict(box=["10", "20", "170", "110"]), "outside"),
        (dict(box=["10", "20", "10", "110"]), "zero area"),
        (dict(model="no_model"), "no_model"),
        (dict(point=["5", "5", "3"]), "LABEL"),
        (dict(out="mask.gif"), "mask.gif"),
    ],
)
def test_user_errors_exit_2_without_output(tiny_sam, images, tmp_path, capsys, change, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = dict(model=str(tiny_sam[2]), image=images["rgb.jpg"], box=["10", "20", "150", "110"], out="mask.png")
    args.update(change)
    argv = ["--model", str(tmp_path / args["model"]) if args["model"] == "no_model" else args["model"]]
    argv += ["--image", args["image"] if "/" in args["image"] else str(tmp_path / args["image"])]
    argv += ["--box", *args["box"], "--out", str(tmp_path / args["out"]), "--overlay", str(tmp_path / "overlay.png")]
    if "point" in args:
        argv += ["--point", *args["point"]]
    code, io = _run(capsys, *argv)
    assert code == 2
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], io.err
    assert "skip_bad" not in lines[0]  # a dataset option, meaningless here
    assert not (tmp_path / args["out"]).exists() and not (tmp_path / "overlay.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_command_line_exit_status(tiny_sam, tmp_path):
    result = subprocess.run(
        [sys.executable, "predict.py", "--model", str(tmp_path / "absent"), "--image", "x.png",
         "--box", "0", "0", "5", "5", "--out", str(tmp_path / "m.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr
