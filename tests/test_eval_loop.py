"""Evaluation end to end on generated data: box evaluation, resume, geometries, click protocol, eval.py.

Tiny random-weight SAM and HQ-SAM models (256-px input) on six 384-px synthetic DIS5K images.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pisam_jax import transforms
from pisam_jax.data import images
from pisam_jax.data.datasets import Dataset, open_dataset
from pisam_jax.data.pipeline import tight_box
from pisam_jax.data.synthetic import generate
from pisam_jax.evaluation import loop
from pisam_jax.evaluation.metrics import iou
from pisam_jax.evaluation.segmenter import BoxSegmenter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate(str(root / "DIS5K" / "DIS-VD"), n=6, size=384, seed=0, progress=False)
    generate(str(root / "DIS5K" / "DIS-TE1"), n=2, size=384, seed=1, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_hq(tmp_path_factory):
    from convert.hq_sam import convert_hq_sam
    from references.hq import TINY, build_torch_hq_sam, save_official

    root = tmp_path_factory.mktemp("tiny_hq_eval")
    save_official(build_torch_hq_sam(**TINY, seed=1), root / "sam_hq_tiny.pth")
    return convert_hq_sam(root / "sam_hq_tiny.pth", root / "hq_tiny")


@pytest.fixture(scope="module")
def sam_seg(tiny_sam):
    return BoxSegmenter.load(tiny_sam[2], name="sam", geometry="stretch")


def test_box_eval_writes_scores_and_resumes(sam_seg, data_root, tmp_path):
    ds = open_dataset("DIS5K-VD", str(data_root))
    first = loop.evaluate_dataset(sam_seg, ds, tmp_path, show_progress=False)
    assert sorted(first.computed) == sorted(s.name for s in ds.samples) and not first.reused
    for s in ds.samples:  # 0/255 PNGs at the original resolution
        pred = images.read_mask(tmp_path / "sam" / "DIS5K-VD" / f"{s.name}.png")
        assert pred.shape == (s.height, s.width)
        assert set(np.unique(pred)) <= {0, 255}
    assert first.results["num_images"] == 6
    for k in ("max_f", "weighted_f", "mae", "s_measure", "mean_e", "hce", "iou", "boundary_iou"):
        assert np.isfinite(first.results[k]), k
    saved = json.loads((tmp_path / "sam" / "DIS5K-VD.json").read_text())
    assert saved["results"]["iou"] == pytest.approx(first.results["iou"])
    assert saved["settings"]["geometry"] == "stretch"
    assert not list((tmp_path / "sam" / "DIS5K-VD").glob(".*"))  # no temporary files left

    # Resume: delete two predictions; only they are recomputed, the others are not rewritten.
    deleted = [ds.samples[1].name, ds.samples[4].name]
    for n in deleted:
        os.remove(tmp_path / "sam" / "DIS5K-VD" / f"{n}.png")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sam" / "DIS5K-VD").glob("*.png")}
    second = loop.evaluate_dataset(sam_seg, ds, tmp_path, show_progress=False)
    assert sorted(second.computed) == sorted(deleted) and len(second.reused) == 4
    assert {p: (tmp_path / "sam" / "DIS5K-VD" / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert second.results == first.results
    assert second.per_image == first.per_image

    # Other settings in the same output folder: a clear error, not mixed predictions.
    other = BoxSegmenter(sam_seg.model, name="sam", geometry="longest_side")
    with pytest.raises(loop.EvalError, match="geometry: stretch there, longest_side now"):
        loop.evaluate_dataset(other, ds, tmp_path, show_progress=False)


def test_a_changed_model_is_not_reused(sam_seg, tiny_sam, data_root, tmp_path):
    """A model folder re-converted or re-exported under the same name: its earlier predictions are not reused
    (the issue measured MAE 0.325 reused against 0.414 fresh); the run stops naming the model and both
    fingerprints, and leaves the predictions as they were."""
    from pisam_jax import models
    from pisam_jax.evaluation import interactive

    ds = open_dataset("DIS5K-TE1", str(data_root))
    loop.evaluate_dataset(BoxSegmenter(sam_seg.model, name="m", predictor=sam_seg.predictor), ds, tmp_path,
                          show_progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()}
    old = models.params_fingerprint(sam_seg.model)
    assert json.loads((tmp_path / "m" / "settings.json").read_text())[loop.PARAMS_KEY] == old
    assert json.loads((tmp_path / "m" / "DIS5K-TE1.json").read_text())["settings"][loop.PARAMS_KEY] == old

    from tests.test_models_io import other_weights

    changed = BoxSegmenter(other_weights(tiny_sam[2]), name="m")
    new = models.params_fingerprint(changed.model)
    with pytest.raises(loop.EvalError, match=rf"holds predictions of other weights: the model named m changed since "
                                             rf".*params_sha256: {old[:12]}\.\.\. there, {new[:12]}\.\.\. now"):
        loop.evaluate_dataset(changed, ds, tmp_path, show_progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").rglob("*") if p.is_file()} == before

    # the click stage's records say which model changed, too
    clicks = tmp_path / "clicks"
    interactive.check_click_settings(clicks, dict(models={"m": loop.model_settings(sam_seg)}, seed=0))
    (clicks / "m" / "DIS5K-TE1").mkdir(parents=True)
    (clicks / "m" / "DIS5K-TE1" / "x.npz").write_bytes(b"")
    with pytest.raises(loop.EvalError, match=rf"model m: params_sha256: {old[:12]}\.\.\. there, {new[:12]}"):
        interactive.check_click_settings(clicks, dict(models={"m": loop.model_settings(changed)}, seed=0))


def _one_image(data_root):
    ds = open_dataset("DIS5K-VD", str(data_root))
    s = next(s for s in ds.samples if s.height != s.width) if any(
        s.height != s.width for s in ds.samples) else ds.samples[0]
    return Dataset(ds.name, [s]), s


@pytest.mark.parametrize("geometry", ["stretch", "longest_side"])
def test_geometry_matches_direct_predictor(sam_seg, data_root, tmp_path, geometry):
    """The loop's prediction equals the Predictor driven by hand in each geometry (a known case)."""
    ds, s = _one_image(data_root)
    model = sam_seg.model
    seg = BoxSegmenter(model, name="m", geometry=geometry, predictor=sam_seg.predictor)
    loop.evaluate_dataset(seg, ds, tmp_path, show_progress=False)
    saved = images.read_mask(tmp_path / "m" / "DIS5K-VD" / f"{s.name}.png") > 128

    image, gt = images.read_image(s.image_path), images.read_mask(s.mask_path)
    p, size = seg.predictor, model.config.image_size
    if geometry == "stretch":  # 1024x1024 (here 256x256) in, bilinear back to H x W, > 0
        p.set_image(transforms.resize_stretch(image, size))
        box, _ = tight_box(transforms.resize_stretch(gt, size))
        logits, _, _ = p.predict(box=box, multimask_output=False, return_logits=True)
        expected = transforms.resize_bilinear(logits[0].astype(np.float32), gt.shape) > 0
    else:  # SAM's own frame: the box of the resized GT, mapped back to the original pixels
        p.set_image(image)
        resized = transforms.resize_longest_side(gt, size)
        box, _ = tight_box(resized)
        box = box * np.array([gt.shape[1] / resized.shape[1], gt.shape[0] / resized.shape[0]] * 2)
        masks, _, _ = p.predict(box=box, multimask_output=False)
        expected = masks[0]
    assert saved.shape == gt.shape
    np.testing.assert_array_equal(saved, expected)


def test_gt_as_prediction_scores_perfectly(data_root):
    ds = open_dataset("DIS5K-VD", str(data_root))
    gt_dir = data_root / "DIS5K" / "DIS-VD" / "gt"
    res = loop.score_folder(gt_dir, ds).results()
    assert res["iou"] == 1.0 and res["boundary_iou"] == 1.0 and res["mae"] == 0.0
    assert res["max_f"] == pytest.approx(1.0, abs=1e-3) and res["s_measure"] == pytest.approx(1.0)
    assert res["hce"] == 0.0
    with pytest.raises(loop.EvalError, match="not found"):
        loop.score_folder(data_root / "nowhere", ds)


def _load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def run_cli(*args) -> int:
    """eval.py in this process (its compiled functions are not shared with the fixtures): its exit status."""
    from absl import flags

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["eval.py", *args])
    try:
        CLI.main(["eval.py"])
    except SystemExit as e:
        return e.code
    return 0


def test_cli_missing_dataset_exit_2(tiny_sam, data_root, tmp_path):
    """The real command: one line, status 2, no traceback."""
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", str(tiny_sam[2]), "--data_root",
                        str(data_root), "--datasets", "DIS5K-TE2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "DIS-TE2/im: image folder of dataset DIS5K-TE2 not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_user_errors_exit_2(tiny_sam, data_root, tmp_path, capsys):
    bad = tmp_path / "bad"  # a truncated image: its header reads, its pixels do not
    generate(str(bad / "DIS5K" / "DIS-TE3"), n=2, size=128, seed=3, progress=False)
    jpg = sorted((bad / "DIS5K" / "DIS-TE3" / "im").glob("*.jpg"))[0]
    jpg.write_bytes(jpg.read_bytes()[:200])
    cases = [
        (["--datasets", "DIS5K-XX"], "unknown dataset 'DIS5K-XX'"),
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--clicks", "1,x"], "--clicks takes comma-separated integers"),
        (["--click_modes", "ALL,XY"], "--click_modes: unknown"),
        (["--data_root", str(bad), "--datasets", "DIS5K-TE3"], jpg.name),
    ]
    for extra, message in cases:
        code = run_cli("--model", str(tiny_sam[2]), "--data_root", str(data_root), "--datasets", "DIS5K-VD",
                       "--out", str(tmp_path / "o"), "--noprogress", *extra)
        err = capsys.readouterr().err
        assert code == 2, (extra, err[-2000:])
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], err[-2000:]


@pytest.fixture(scope="module")
def cli_out(tiny_sam, tiny_hq, data_root, tmp_path_factory):
    """eval.py on two models, two datasets, the click protocol with 1 and 2 clicks in three modes."""
    tmp = tmp_path_factory.mktemp("cli")
    sam_dir = tmp / "sam_tiny"
    os.symlink(tiny_sam[2], sam_dir)
    out = tmp / "out"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = run_cli("--model", f"{sam_dir},{tiny_hq}", "--data_root", str(data_root), "--datasets",
                       "DIS5K-VD,DIS5K-TE1", "--out", str(out), "--clicks", "1,2", "--click_modes", "ALL,FG,BG",
                       "--subset", "3", "--gallery", "2", "--noprogress")
    assert code == 0
    return out, stdout.getvalue()


def test_cli_end_to_end(cli_out):
    out, stdout = cli_out
    for stem in ("dis", "all", "clicks_table", "click_modes_table"):
        for ext in ("md", "csv", "json"):
            assert (out / f"{stem}.{ext}").is_file(), f"{stem}.{ext}"
    assert (out / "clicks.png").is_file() and (out / "clicks" / "subset.json").is_file()
    assert len(list((out / "galleries").glob("*.png"))) == 4
    assert len(list((out / "sam_tiny" / "DIS5K-VD").glob("*.png"))) == 6
    assert "Results on DIS5K" in stdout and "Interactive correction" in stdout
    umask = os.umask(0)
    os.umask(umask)
    for p in out.rglob("*"):  # every table, mask, record and folder: the umask decides, not mkstemp's 0600
        assert stat.S_IMODE(p.stat().st_mode) == (0o777 if p.is_dir() else 0o666) & ~umask, p
    settings = json.loads((out / "sam_tiny" / "settings.json").read_text())
    assert "model sam_tiny: " in stdout and f"parameters sha256 {settings[loop.PARAMS_KEY][:16]}" in stdout
    assert "Preference for click types" in stdout and "worst-case overlays" in stdout
    dis = json.loads((out / "dis.json").read_text())
    assert set(dis) == {"sam_tiny", "hq_tiny"} and set(dis["hq_tiny"]) == {"DIS5K-VD", "DIS5K-TE1"}
    assert dis["hq_tiny"]["DIS5K-VD"]["num_images"] == 6


def test_click_protocol(cli_out, data_root):
    out, _ = cli_out
    subset = json.loads((out / "clicks" / "subset.json").read_text())["names"]
    assert 1 <= len(subset) <= 3
    table2 = json.loads((out / "clicks_table.json").read_text())
    table7 = json.loads((out / "click_modes_table.json").read_text())
    for m in ("sam_tiny", "hq_tiny"):
        assert sorted(table2[m]) == ["0", "1", "2"]
        assert set(table7[m]) == {"Ori", "ALL", "FG", "BG"}
        assert table2[m]["0"]["num_images"] == len(subset)
        assert table7[m]["ALL"] == table2[m]["2"]
    per_image = json.loads((out / "clicks" / "per_image.json").read_text())
    assert len(per_image) == 2 * len(subset)
    # Ori is the box prediction: the same as the box evaluation's saved PNG.
    for rec in per_image:
        ds_name, name = rec["image"].split("/")
        folder = "DIS-VD" if ds_name == "DIS5K-VD" else "DIS-TE1"
        saved = images.read_mask(loop.prediction_path(out, rec["model"], ds_name, name))
        gt = images.read_mask(data_root / "DIS5K" / folder / "gt" / f"{name}.png")
        assert rec["Ori"]["iou"] == pytest.approx(iou(saved, gt))
    # Every model gets the same clicks for an image: they come from the overlapping errors.
    by_image = {}
    for rec in per_image:
        by_image.setdefault(rec["image"], []).append(rec)
    for recs in by_image.values():
        assert len(recs) == 2
        for key in ("ALL-1", "ALL-2", "FG-2", "BG-2"):
            assert recs[0][key]["clicks"] == recs[1][key]["clicks"]
            assert recs[0][key]["flags"] == recs[1][key]["flags"]
        assert all(f == 1 for f in recs[0]["FG-2"]["flags"]) and all(f == 0 for f in recs[0]["BG-2"]["flags"])
        assert 1 <= len(recs[0]["ALL-2"]["clicks"]) <= 2


class _FakePiPredictor:
    """Records the calls a Pi-SAM Predictor gets; logits > 0 on the left half of its S x S frame."""

    def __init__(self, size):
        self.size, self.calls = size, []

    def set_image(self, image):
        self.calls.append(("set_image", image.shape))

    def _logits(self):
        m = np.full((1, self.size, self.size), -1.0, np.float32)
        m[:, :, : self.size // 2] = 1.0
        return m

    def predict(self, **kw):
        self.calls.append(("predict", kw))
        return self._logits(), np.full((1,), np.nan), np.zeros((1, 16, 16), np.float32)

    def refine(self, clicks, return_logits=False):
        self.calls.append(("refine", clicks, return_logits))
        return self._logits()


def test_pi_path_uses_box_then_refine_with_pixel_clicks():
    """Pi-SAM models: predict(box) then refine([(x, y, is_fg), ...]) in the stretched frame's pixels."""
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(decoder="pi", image_size=64))
    fake = _FakePiPredictor(64)
    seg = BoxSegmenter(model, name="pi", geometry="stretch", predictor=fake, hq_token_only=True)
    assert seg.settings["hq_token_only"] is False  # an HQ-SAM option only
    seg.set_image(np.zeros((30, 50, 3), np.uint8))
    assert fake.calls[0] == ("set_image", (64, 64, 3))
    gt = np.zeros((30, 50), np.uint8)
    gt[10:20, 5:25] = 255
    out = seg.predict_box(seg.gt_box(gt))
    assert fake.calls[1][1] == dict(box=pytest.approx(seg.gt_box(gt)), multimask_output=False, return_logits=True)
    assert out.logits.shape == (30, 50) and out.mask[:, :25].all() and not out.mask[:, 25:].any()
    # a click at pixel (col 10, row 15) of the original is the centre of the same spot in the 64x64 frame
    pts = np.array([[(10 + 0.5) / 50, (15 + 0.5) / 30]])
    logits = seg.refine(out, pts, np.array([0]))
    (_, clicks, return_logits), = [c for c in fake.calls if c[0] == "refine"]
    assert return_logits and len(clicks) == 1 and clicks[0][2] is False
    assert clicks[0][:2] == pytest.approx((10.5 * 64 / 50 - 0.5, 15.5 * 64 / 30 - 0.5))
    assert logits.shape == (30, 50)


def test_pi_model_through_the_click_protocol(data_root, tmp_path):
    """A random-weight Pi-SAM (stage 2, 1024 input) through the real Predictor: box, then refine with clicks."""
    import torch

    from convert.pisam import convert_pisam
    from pisam_jax.evaluation import interactive
    from references.sam import build_torch_sam, save_official
    from tests.test_pi_decoder import SMALL_1024, build_reference

    sam = build_torch_sam(**SMALL_1024)
    save_official(sam, tmp_path / "sam.pth")
    torch.save({"model_state_dict": build_reference(64, True, sam).state_dict()}, tmp_path / "pi.pth")
    seg = BoxSegmenter.load(convert_pisam(tmp_path / "sam.pth", tmp_path / "pi.pth", tmp_path / "pisam"))
    ds = open_dataset("DIS5K-VD", str(data_root))
    ds = Dataset(ds.name, ds.samples[:1])
    res = interactive.evaluate_clicks([seg], [ds], tmp_path / "out", clicks=(2,), modes=("ALL", "BG"), n_subset=1,
                                      show_progress=False)
    assert len(res.subset) == 1 and sorted(res.table2["pisam"]) == [0, 2]
    rec = res.per_image[0]
    assert 1 <= len(rec["ALL-2"]["clicks"]) <= 2 and set(rec["BG-2"]["flags"]) <= {0}
    pred = images.read_mask(loop.prediction_path(tmp_path / "out", "pisam", ds.name, ds.samples[0].name))
    assert pred.shape == (ds.samples[0].height, ds.samples[0].width)


# ----------------------------------------------------------------------------- click stage resume


class _Interrupted(Exception):
    pass


class _Counting:
    """A ``BoxSegmenter`` that counts set_image / refine calls; ``fail_at``: refine raises during that image."""

    def __init__(self, seg, fail_at=None):
        self.seg, self.fail_at, self.images, self.refines = seg, fail_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.seg, name)

    def set_image(self, image):
        self.images += 1
        self.seg.set_image(image)

    def refine(self, *args):
        self.refines += 1
        if self.images == self.fail_at:
            raise _Interrupted
        return self.seg.refine(*args)


CLICK_KW = dict(clicks=(1, 2), modes=("ALL", "FG", "BG"), n_subset=4, show_progress=False)


@pytest.fixture(scope="module")
def sam_ls(sam_seg):
    """A second model that compiles nothing new: the tiny SAM in the longest-side geometry (same 256 input)."""
    return BoxSegmenter(sam_seg.model, name="sam_ls", geometry="longest_side", predictor=sam_seg.predictor)


@pytest.fixture(scope="module")
def click_run(sam_seg, sam_ls, data_root, tmp_path_factory):
    """An uninterrupted click evaluation of two models on DIS5K-VD: (out dir, result)."""
    from pisam_jax.evaluation import interactive

    out = tmp_path_factory.mktemp("clicks_full")
    ds = open_dataset("DIS5K-VD", str(data_root))
    return out, interactive.evaluate_clicks([sam_seg, sam_ls], [ds], out, **CLICK_KW)


def _box_stage_copy(src, dst):
    """A copy of an output folder's box predictions (not its click records): the click stage starts there."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("clicks"))
    return dst


def _records(out):
    return sorted(str(p.relative_to(out)) for p in (out / "clicks").glob("*/*/*.npz"))


def _same_result(res, ref):
    assert res.subset == ref.subset
    assert res.table2 == ref.table2 and res.table7 == ref.table7  # exactly, every metric
    assert res.per_image == ref.per_image


def test_click_stage_resumes_exactly(sam_seg, sam_ls, data_root, click_run, tmp_path):
    """Interrupted inside a refine, the rerun computes only the missing (model, image) pairs; same tables."""
    from pisam_jax.evaluation import interactive

    ref_out, ref = click_run
    n = len(ref.subset)
    assert n >= 3
    assert len(_records(ref_out)) == 2 * n
    out = _box_stage_copy(ref_out, tmp_path / "out")
    ds = open_dataset("DIS5K-VD", str(data_root))

    sam, ls = _Counting(sam_seg), _Counting(sam_ls, fail_at=2)  # sam_ls stops in its second image's clicks
    with pytest.raises(_Interrupted):
        interactive.evaluate_clicks([sam, ls], [ds], out, **CLICK_KW)
    assert (sam.images, ls.images) == (n, 2)
    done = _records(out)
    assert len(done) == n + 1 and sum(r.startswith("clicks/sam_ls/") for r in done) == 1
    assert not list((out / "clicks").rglob("*.tmp"))  # nothing half-written

    bars = []

    def progress(iterable, total, desc, enabled=True, initial=0):
        bars.append((desc, total, initial))
        return iterable

    sam, ls = _Counting(sam_seg), _Counting(sam_ls)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "progress", progress)
        res = interactive.evaluate_clicks([sam, ls], [ds], out, **CLICK_KW)
    assert (sam.images, sam.refines) == (0, 0)  # every sam image was read back
    assert ls.images == n - 1 and ls.refines > 0
    assert [b for b in bars if b[0].endswith(" clicks")] == [("sam clicks", n, n), ("sam_ls clicks", n, 1)]
    _same_result(res, ref)
    assert json.loads((out / "clicks" / "per_image.json").read_text()) == json.loads(
        (ref_out / "clicks" / "per_image.json").read_text())

    # A finished run again: nothing is predicted.
    sam, ls = _Counting(sam_seg), _Counting(sam_ls)
    _same_result(interactive.evaluate_clicks([sam, ls], [ds], out, **CLICK_KW), ref)
    assert sam.images == ls.images == 0


def test_click_stage_redoes_unreadable_records(sam_seg, sam_ls, data_root, click_run, tmp_path, caplog):
    """A truncated or foreign record (a crash mid-write without the rename, a damaged disk) is computed again."""
    import shutil

    from pisam_jax.evaluation import interactive

    ref_out, ref = click_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    ds = open_dataset("DIS5K-VD", str(data_root))
    truncated = interactive.record_path(out, "sam", ref.subset[0])
    truncated.write_bytes(truncated.read_bytes()[:1000])
    foreign = interactive.record_path(out, "sam_ls", ref.subset[1])  # another image's record under its name
    shutil.copy(interactive.record_path(out, "sam_ls", ref.subset[0]), foreign)

    sam, ls = _Counting(sam_seg), _Counting(sam_ls)
    with caplog.at_level("WARNING"):
        res = interactive.evaluate_clicks([sam, ls], [ds], out, **CLICK_KW)
    assert sam.images == ls.images == 1
    assert sum("unreadable click record" in r.getMessage() for r in caplog.records) == 2
    _same_result(res, ref)


def test_click_stage_other_settings(sam_seg, sam_ls, data_root, click_run, tmp_path):
    """Other clicks / modes / seed / models: a clear error; another subset size reuses the stored images."""
    import shutil

    from pisam_jax.evaluation import interactive

    ref_out, ref = click_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    ds = open_dataset("DIS5K-VD", str(data_root))
    cases = [
        (dict(CLICK_KW, seed=1), "seed: 0 there, 1 now"),
        (dict(CLICK_KW, clicks=(1, 3)), "clicks: [1, 2] there, [1, 3] now"),
        (dict(CLICK_KW, modes=("ALL",)), "modes: ['ALL', 'FG', 'BG'] there, ['ALL'] now"),
    ]
    for kw, message in cases:
        with pytest.raises(loop.EvalError, match=r"clicks holds click results made with other settings \(.*"
                           + message.replace("[", r"\[").replace("]", r"\]")):
            interactive.evaluate_clicks([sam_seg, sam_ls], [ds], out, **kw)
    with pytest.raises(loop.EvalError, match="models: "):
        interactive.evaluate_clicks([sam_seg], [ds], out, **CLICK_KW)
    assert _records(out) == _records(ref_out)  # nothing was touched

    sam, ls = _Counting(sam_seg), _Counting(sam_ls)
    res = interactive.evaluate_clicks([sam, ls], [ds], out, **dict(CLICK_KW, n_subset=2))
    assert sam.images == ls.images == 0 and res.subset == ref.subset[:2]
    assert res.per_image == [r for r in ref.per_image if r["image"] in res.subset]

    # Other settings in a folder without records (e.g. the first run stopped in the box stage): no error.
    shutil.rmtree(out / "clicks" / "sam")
    shutil.rmtree(out / "clicks" / "sam_ls")
    interactive.check_click_settings(out / "clicks", dict(seed=5))
    assert json.loads((out / "clicks" / "settings.json").read_text()) == dict(seed=5)


def test_metric_state_replay_is_exact(tmp_path):
    """A MetricSuite rebuilt from stored records equals one fed the masks: every metric, curves included."""
    from pisam_jax.evaluation import interactive
    from pisam_jax.evaluation.metrics import METRICS, MetricSuite

    rng = np.random.default_rng(0)
    direct, replayed = MetricSuite(METRICS), MetricSuite(METRICS)
    keys = direct.image_state_keys()
    assert {"fm:changeable_fms", "em:changeable_ems", "wfm:weighted_fms", "hce:hces"} <= set(keys)
    for i in range(5):
        gt = (rng.random((40, 56)) < 0.3).astype(np.uint8) * 255
        pred = rng.integers(0, 256, (40, 56), dtype=np.uint8) if i % 2 else rng.random((40, 56)) < 0.4
        direct.update(pred, gt, f"im{i}")
        score, state = interactive._score(METRICS, pred, gt, f"im{i}")
        path = interactive.record_path(tmp_path, "m", f"d/im{i}")
        interactive._write_record(path, {"model": "m", "image": f"d/im{i}", "Ori": score}, {"Ori": state}, 7)
        rec, states = interactive._read_record(path, "m", f"d/im{i}", ["Ori"], keys, 7)
        replayed.add_image(rec["Ori"], states["Ori"])
    assert replayed.results() == direct.results()
    assert replayed.per_image == direct.per_image
