"""The NoC protocol: RITM's clicker on hand-made masks, each family's prompts, a tiny run end to end, resume."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage

from pisam_jax.data import images
from pisam_jax.data.datasets import open_dataset, read_labels
from pisam_jax.data.synthetic import generate
from pisam_jax.evaluation import clicker, loop, noc, reports
from pisam_jax.evaluation.clicker import Click, Clicker, next_click
from pisam_jax.evaluation.segmenter import BoxOutput, BoxSegmenter

# ----------------------------------------------------------------------------- the clicker on hand-made masks


def _rect(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


def test_first_click_is_the_deepest_pixel():
    """Object rows 2..8, cols 3..13: depth min(r - 1, 9 - r, c - 2, 14 - c) peaks at 4 on row 5, cols 6..10;
    the first of them in raster order is (5, 6). An empty prediction: a positive click."""
    fg = _rect((12, 20), (2, 8), (3, 13))
    assert next_click(np.zeros_like(fg), fg) == Click(5, 6, True)


def test_image_border_counts_as_outside():
    """Object = columns 0..4 of a 7 x 10 image, touching three borders. With the 1-px border, pixel (r, c) has
    depth min(c + 1, 5 - c, r + 1, 7 - r): 3 at rows 2..4 of column 2, so (2, 2). Without it the rows would be
    unbounded and the click would land on the top border, at (0, 2)."""
    fg = _rect((7, 10), (0, 6), (0, 4))
    assert next_click(np.zeros_like(fg), fg) == Click(2, 2, True)
    assert clicker.depth(fg)[0, 2] == 1 and clicker.depth(fg)[3, 2] == 3


def test_deeper_error_wins_and_a_tie_clicks_negative():
    fg = _rect((20, 20), (1, 5), (1, 5))  # missed: 5 x 5, depth 3 at (3, 3)
    fp = _rect((20, 20), (10, 16), (10, 16))  # false positive: 7 x 7, depth 4 at (13, 13)
    assert next_click(fp, fg) == Click(13, 13, False)
    fp_small = _rect((20, 20), (10, 12), (10, 12))  # 3 x 3, depth 2: the missed square is deeper
    assert next_click(fp_small, fg) == Click(3, 3, True)
    fp_same = _rect((20, 20), (10, 14), (10, 14))  # 5 x 5, depth 3 as the missed one: RITM's tie -> negative
    assert next_click(fp_same, fg) == Click(12, 12, False)


def test_clicked_pixels_are_never_clicked_again():
    fg = _rect((12, 20), (2, 8), (3, 13))
    c = Clicker(fg)
    empty = np.zeros_like(fg)
    # depth 4 only on row 5, cols 6..10; then depth 3, first at (4, 5): min(4 - 1, 9 - 4, 5 - 2, 14 - 5) = 3
    assert [c.click(empty) for _ in range(6)] == [Click(5, c_, True) for c_ in (6, 7, 8, 9, 10)] + [Click(4, 5, True)]
    pts, labels = c.points()
    assert pts[0] == pytest.approx(((6 + 0.5) / 20, (5 + 0.5) / 12)) and labels.tolist() == [1] * 6


def test_ignored_pixels_are_neither_clicked_nor_scored():
    """GrabCut's unlabelled band: a missed region inside it is invisible to the clicker and to the IoU."""
    fg = _rect((12, 12), (2, 5), (2, 5))  # 16 px
    ignore = _rect((12, 12), (7, 11), (0, 11))  # rows 7..11
    pred = fg | _rect((12, 12), (8, 10), (2, 9))  # right object, plus a false positive inside the band
    assert clicker.iou(pred, fg, ignore) == 1.0 and clicker.iou(pred, fg) == 16 / (16 + 24)
    assert next_click(pred, fg, ignore) is None
    assert next_click(pred, fg) == Click(9, 3, False)


def test_no_error_no_click():
    fg = _rect((8, 8), (2, 5), (2, 5))
    assert next_click(fg, fg) is None
    assert clicker.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_noc_and_nof_by_hand():
    ious = [0.5, 0.86, 0.91, 0.96]
    assert [clicker.noc(ious, t, 3) for t in (0.85, 0.90, 0.95)] == [1, 2, 3]
    assert not clicker.failed(ious, 0.95, 3) and clicker.failed(ious, 0.97, 3)
    assert clicker.noc(ious, 0.97, 3) == 3  # never reached: max_clicks
    assert clicker.noc([0.9, 0.2], 0.85, 1) == 0  # the box alone was enough
    assert clicker.noc([float("nan"), 0.9], 0.85, 1) == 1  # the clicks-only start has no mask at 0
    assert clicker.noc([0.1, 0.2, 0.99], 0.9, 1) == 1 and clicker.failed([0.1, 0.2, 0.99], 0.9, 1)  # past max
    assert clicker.threshold_label(0.9) == "90" and clicker.threshold_label(0.875) == "87.5"


def test_depth_is_the_exact_euclidean_distance(monkeypatch):
    rng = np.random.default_rng(0)
    region = ndimage.binary_opening(rng.random((61, 47)) < 0.8, iterations=2)
    exact = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    fast = clicker.depth(region)
    assert fast.dtype == np.float32 and np.array_equal(fast, exact.astype(np.float32))
    monkeypatch.setattr(clicker, "EXACT_FLOAT32_DEPTH", 2.0)  # deep regions: measured again in float64
    deep = clicker.depth(region)
    assert deep.dtype == np.float64 and np.array_equal(deep, exact)


# ----------------------------------------------------------------------------- the protocol with known answers


class _Oracle:
    """A segmenter that answers with the GT components holding a positive click (and, from a box, the first
    component): known IoUs. Records what each call was given."""

    def __init__(self, fg, is_pi):
        self.labels, _ = ndimage.label(fg)
        self.is_pi = is_pi
        self.calls = []

    def _mask(self, points, labels, with_box):
        h, w = self.labels.shape
        keep = {1} if with_box else set()
        for (x, y), lab in zip(points, labels):
            if lab == 1:
                keep.add(self.labels[round(y * h - 0.5), round(x * w - 0.5)])
        return np.isin(self.labels, list(keep - {0}))

    def _out(self, mask, box, tag):
        return BoxOutput(np.where(mask, 1.0, -1.0).astype(np.float32), np.full((1, 4, 4), tag, np.float32), box)

    def gt_box(self, gt):
        return np.array([0.0, 0.0, 5.0, 5.0], np.float32)

    def predict_box(self, box):
        self.calls.append(("box",))
        return self._out(self._mask([], [], True), box, -1.0)

    def refine(self, initial, points, labels):
        self.calls.append(("refine", initial.low_res[0, 0, 0], len(labels)))
        return np.where(self._mask(points, labels, True), 1.0, -1.0).astype(np.float32)

    def predict_points(self, points, labels, *, box=None, mask_input=None):
        self.calls.append(("points", len(labels), None if box is None else tuple(box),
                           None if mask_input is None else float(mask_input[0, 0, 0])))
        return self._out(self._mask(points, labels, box is not None), box, float(len(labels)))


def _three_squares():
    fg = np.zeros((40, 40), bool)
    fg[2:10, 2:10] = True  # 64 px (the box's component: label 1)
    fg[20:26, 20:26] = True  # 36 px
    fg[30:34, 4:8] = True  # 16 px
    return fg


def test_known_noc_from_clicks_alone():
    """Clicks alone: the deepest square first, then the next: IoU 64/116, 100/116, 1 and then no click left."""
    fg = _three_squares()
    seg = _Oracle(fg, is_pi=False)
    rec = noc.run_image(seg, "clicks", fg, None, 20)
    assert np.isnan(rec["ious"][0])
    assert rec["ious"][1:4] == pytest.approx([64 / 116, 100 / 116, 1.0]) and rec["ious"][4:] == [1.0] * 17
    assert [c[:2] for c in rec["clicks"]] == [[5, 5], [22, 22], [31, 5]] and all(c[2] for c in rec["clicks"])
    assert len(rec["seconds_clicks"]) == 3 and len(rec["seconds_clicker"]) == 20
    s = noc.summarize([rec], (0.85, 0.90, 0.95), 20)
    assert (s["NoC@85"], s["NoC@90"], s["NoC@95"], s["NoF@95"]) == (2, 3, 3, 0)
    # every later prompt brings all clicks so far and the previous answer's low-res logits, no box
    assert seg.calls == [("points", 1, None, None), ("points", 2, None, 1.0), ("points", 3, None, 2.0)]


@pytest.mark.parametrize("is_pi", [True, False])
def test_each_family_answers_from_the_box(is_pi):
    """Box start: click 0 is the box's mask (64/116). Pi-SAM refines the box's answer with all clicks so far;
    SAM / HQ-SAM get the box, all clicks and the previous low-res logits."""
    fg = _three_squares()
    seg = _Oracle(fg, is_pi=is_pi)
    rec = noc.run_image(seg, "box", fg, None, 5)
    assert rec["ious"] == pytest.approx([64 / 116, 100 / 116, 1.0, 1.0, 1.0, 1.0])
    assert sorted(rec["thumbs"]) == [0, 1, 3, 5]
    s = noc.summarize([rec], (0.5, 0.85, 0.9), 5)
    assert (s["NoC@50"], s["NoC@85"], s["NoC@90"]) == (0, 1, 2)
    box = (0.0, 0.0, 5.0, 5.0)
    if is_pi:
        assert seg.calls == [("box",), ("refine", -1.0, 1), ("refine", -1.0, 2)]
    else:
        assert seg.calls == [("box",), ("points", 1, box, -1.0), ("points", 2, box, 1.0)]


def test_results_tables_and_failures():
    """Two images: one reaches 0.9 at click 2, one never: NoC@90 = (2 + 20) / 2, NoF@90 = 1, mIoU per click."""
    a = dict(ious=[0.5, 0.8, 0.95] + [0.95] * 18)
    b = dict(ious=[0.2] * 21)
    s = noc.summarize([a, b], (0.9,), 20)
    assert s["NoC@90"] == 11.0 and s["NoF@90"] == 1 and s["num_images"] == 2
    assert s["mIoU"][:3] == pytest.approx([0.35, 0.5, 0.575])
    summary = {"m": {"box": {"D": s}, "clicks": {"D": dict(s, **{"NoC@90": 12.0})}}}
    table = reports.noc_table(summary, (0.9,), ["D"], {"m": {"box": {"s_per_click": 0.01},
                                                             "clicks": {"s_per_click": 0.02}}})
    md = reports.to_markdown(table)
    assert "| m | box + clicks | **11.00** | 1 | **0.01** |" in md and "| m | clicks only | 12.00 | 1 | 0.02 |" in md
    assert reports.to_csv(table).splitlines()[0] == "model,start,D/NoC@90,D/NoF@90,s_per_click"


# ----------------------------------------------------------------------------- end to end on synthetic data

TINY = dict(image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
            window_size=2)


def _random_model(decoder, seed=0, **extra):
    """A tiny random-weight model, filled directly (random init op by op takes ~20 s on this machine)."""
    from pisam_jax.models import ModelConfig, abstract_model

    graphdef, state = nnx.split(abstract_model(ModelConfig(decoder=decoder, **TINY, **extra)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.05, s.shape).astype(s.dtype)), state)
    return nnx.merge(graphdef, state)


class _Counting:
    """A segmenter that counts its encoder runs; ``fail_at``: the answer to that click number raises."""

    def __init__(self, seg, fail_at=None):
        self.seg, self.fail_at, self.encoded, self.answers = seg, fail_at, 0, 0

    def __getattr__(self, name):
        return getattr(self.seg, name)

    def set_image(self, image):
        self.encoded += 1
        self.seg.set_image(image)

    def predict_points(self, *args, **kw):
        self.answers += 1
        if self.answers == self.fail_at:
            raise KeyboardInterrupt
        return self.seg.predict_points(*args, **kw)


@pytest.fixture(scope="module")
def segs():
    return [BoxSegmenter(_random_model("sam"), name="sam"), BoxSegmenter(_random_model("pi", interactor=True), name="pisam")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("noc_data")
    generate(str(root / "DIS5K" / "DIS-VD"), n=2, size=96, seed=0, progress=False)
    return open_dataset("DIS5K-VD", str(root))


KW = dict(max_clicks=3, show_progress=False)


@pytest.fixture(scope="module")
def noc_run(segs, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("noc_out")
    counting = [_Counting(s) for s in segs]
    res = noc.evaluate_noc(counting, [dataset], out, **KW)
    return out, res, counting


def test_noc_end_to_end(noc_run, segs, dataset):
    out, res, counting = noc_run
    assert [c.encoded for c in counting] == [2, 2]  # once per image, for both of SAM's starts
    assert res.computed == 6 and set(res.summary) == {"sam", "pisam"}
    assert set(res.summary["sam"]) == {"box", "clicks"} and set(res.summary["pisam"]) == {"box"}
    for s in dataset.samples:
        fg, _ = read_labels(s.mask_path)
        image = images.read_image(s.image_path)
        for seg in segs:
            rec = res.records[seg.name, "box", dataset.name, s.name]
            seg.set_image(image)
            box_mask = seg.predict_box(seg.gt_box(fg.astype(np.uint8) * 255)).mask
            assert rec["ious"][0] == clicker.iou(box_mask, fg)  # click 0: the box evaluation's mask
            first = next_click(box_mask, fg)
            assert rec["clicks"][0] == [first.row, first.col, first.positive]
            assert (out / "noc" / seg.name / "box" / dataset.name / f"{s.name}.npz").is_file()
        rec = res.records["sam", "clicks", dataset.name, s.name]
        assert np.isnan(rec["ious"][0]) and rec["clicks"][0][:2] == list(next_click(np.zeros_like(fg), fg)[:2])
    for m, per in res.summary.items():
        for st, by_ds in per.items():
            recs = [res.records[m, st, dataset.name, s.name] for s in dataset.samples]
            got = by_ds[dataset.name]
            assert got["NoC@90"] == np.mean([clicker.noc(r["ious"], 0.9, 3) for r in recs])
            assert got["mIoU"][3] == pytest.approx(np.mean([r["ious"][3] for r in recs]), abs=1e-15)
            assert res.timing[m][st]["clicks"] == sum(len(r["seconds_clicks"]) for r in recs)
    written = noc.write_reports(res, out, [dataset], gallery=1)
    for name in ("noc.md", "noc.csv", "noc_iou.csv", "noc.json", "noc.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "galleries").glob("*.png")) == [
        "noc_pisam_box_DIS5K-VD.png", "noc_sam_box_DIS5K-VD.png", "noc_sam_clicks_DIS5K-VD.png"]
    rows = reports.read_csv(out / "noc.csv", key_columns=("model", "start"))
    assert [(r["model"], r["start"]) for r in rows] == [("sam", "box"), ("sam", "clicks"), ("pisam", "box")]
    assert rows[2]["DIS5K-VD/NoC@85"] == res.summary["pisam"]["box"]["DIS5K-VD"]["NoC@85"]
    saved = json.loads((out / "noc.json").read_text())
    assert len(saved["per_image"]) == 6 and saved["max_clicks"] == 3
    assert "Clicks to reach an IoU" in reports.to_markdown(written["tables"][0])


def _same(res, ref):
    assert res.summary == ref.summary
    for key, rec in ref.records.items():
        got = res.records[key]
        assert got["clicks"] == rec["clicks"] and np.array_equal(got["ious"], rec["ious"], equal_nan=True)


def test_noc_resumes_per_model_and_image(noc_run, segs, dataset, tmp_path, caplog):
    out, ref, _ = noc_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    first, second = (s.name for s in dataset.samples)
    (copy / "noc" / "sam" / "clicks" / dataset.name / f"{first}.npz").unlink()
    (copy / "noc" / "pisam" / "box" / dataset.name / f"{second}.npz").write_bytes(b"not a record")
    counting = [_Counting(s) for s in segs]
    res = noc.evaluate_noc(counting, [dataset], copy, **KW)
    assert res.computed == 2 and [c.encoded for c in counting] == [1, 1]  # only the images with work left
    assert "unreadable NoC record" in caplog.text
    _same(res, ref)


def test_noc_interrupted_run_resumes(segs, dataset, noc_run, tmp_path):
    """Killed inside SAM's second image, the rerun completes it and equals an uninterrupted run; nothing
    half-written is left."""
    _, ref, _ = noc_run
    counting = [_Counting(segs[0], fail_at=7), _Counting(segs[1])]  # 6 answers per image for SAM's two starts
    with pytest.raises(KeyboardInterrupt):
        noc.evaluate_noc(counting, [dataset], tmp_path, **KW)
    done = sorted(p.relative_to(tmp_path / "noc").as_posix() for p in (tmp_path / "noc").rglob("*.npz"))
    first = dataset.samples[0].name
    assert done == [f"sam/box/DIS5K-VD/{first}.npz", f"sam/clicks/DIS5K-VD/{first}.npz"]
    assert not [p for p in (tmp_path / "noc").rglob(".*")]
    res = noc.evaluate_noc(segs, [dataset], tmp_path, **KW)
    assert res.computed == 4
    _same(res, ref)


def test_noc_refuses_other_settings(segs, dataset, noc_run, tmp_path):
    out, _, _ = noc_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    with pytest.raises(loop.EvalError, match="max_clicks: 3 there, 4 now"):
        noc.evaluate_noc(segs, [dataset], copy, max_clicks=4, show_progress=False)
    other = BoxSegmenter(_random_model("sam", seed=1), name="sam")  # other weights under the same name
    with pytest.raises(loop.EvalError, match="other weights"):
        noc.evaluate_noc([other], [dataset], copy, **KW)
    stage1 = BoxSegmenter(_random_model("pi"), name="pi1")
    with pytest.raises(loop.EvalError, match="without its interactor"):
        noc.evaluate_noc([stage1], [dataset], copy, **KW)
    with pytest.raises(loop.EvalError, match="starts from a box only"):
        noc.evaluate_noc([segs[1]], [dataset], copy, starts=("clicks",), **KW)


# ----------------------------------------------------------------------------- eval.py --protocol noc


def test_cli_noc(segs, dataset, tmp_path, capsys):
    # eval.py is loaded once, by test_eval_loop: absl refuses its flags a second time
    from pisam_jax.models import save_model
    from tests.test_eval_loop import run_cli

    save_model(segs[0].model, tmp_path / "sam")
    root = Path(dataset.samples[0].image_path).parents[3]
    args = ["--protocol", "noc", "--model", str(tmp_path / "sam"), "--data_root", str(root), "--datasets", "DIS5K-VD",
            "--out", str(tmp_path / "out"), "--max_clicks", "1", "--starts", "box", "--gallery", "1", "--noprogress"]
    assert run_cli(*args) == 0
    stdout = capsys.readouterr().out
    assert "Clicks to reach an IoU" in stdout and "Mean IoU after k clicks" in stdout and "2 run(s) computed" in stdout
    saved = json.loads((tmp_path / "out" / "noc.json").read_text())
    assert list(saved["summary"]) == ["sam"] and list(saved["summary"]["sam"]) == ["box"]
    assert len(saved["summary"]["sam"]["box"]["DIS5K-VD"]["mIoU"]) == 2
    assert (tmp_path / "out" / "galleries" / "noc_sam_box_DIS5K-VD.png").is_file()
    assert run_cli(*args) == 0 and "0 run(s) computed" in capsys.readouterr().out  # resumed: nothing to do
    for extra, message in [(["--clicks", "1,2"], "--clicks belongs to the paper's click protocol"),
                           (["--noc_thresholds", "0.9,1.5"], "--noc_thresholds are IoUs in (0, 1]"),
                           (["--starts", "boxes"], "--starts: unknown ['boxes']"),
                           (["--max_clicks", "0"], "--max_clicks must be positive"),
                           (["--max_clicks", "3"], "max_clicks: 1 there, 3 now"),
                           (["--protocol", "box"], "--max_clicks belongs to --protocol noc")]:
        assert run_cli(*args, *extra) == 2, extra
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and message in err[0], (extra, err)


def test_pi_click_on_the_first_pixel_of_a_larger_image(segs):
    """Pixel (0, 0) of a 96 x 80 image is at (-0.25, -0.2) in the 64-px frame (inside its first pixel): answered
    as that pixel's centre, not refused as outside the image."""
    seg = segs[1]
    seg.set_image(np.zeros((96, 80, 3), np.uint8))
    gt = np.zeros((96, 80), np.uint8)
    gt[:40, :30] = 255
    out = seg.predict_box(seg.gt_box(gt))
    corner = seg.refine(out, np.array([[0.5 / 80, 0.5 / 96]]), np.array([1]))
    centre = seg.refine(out, np.array([[0.5 / 64, 0.5 / 64]]), np.array([1]))  # frame pixel (0, 0)'s centre
    assert np.array_equal(corner, centre)
