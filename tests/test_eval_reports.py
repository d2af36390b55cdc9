"""Reports: table layouts and numbers, CSV/JSON round trips, plot and gallery files."""

import json

import numpy as np
import pytest
from PIL import Image

from pisam_jax.evaluation.reports import (add_dis_te_mean, big_table, click_modes_table, clicks_table,
                                          dis_table, plot_clicks, read_csv, sod_table, to_markdown,
                                          worst_cases_gallery, write_table)

DIS = {  # a slice of paper Table 1 (ViT-h), DIS-TE1 and DIS-VD, HCE only for two models
    "SAM": {"DIS5K-VD": {"max_f": .687, "mae": .151, "hce": 1414.0},
            "DIS5K-TE1": {"max_f": .755, "mae": .106, "hce": 206.0}},
    "HQ-SAM": {"DIS5K-TE1": {"max_f": .895, "mae": .025, "hce": 192.0},
               "DIS5K-VD": {"max_f": .865, "mae": .040, "hce": 1518.0}},
    "Pi-SAM": {"DIS5K-TE1": {"max_f": .917, "mae": .019},
               "DIS5K-VD": {"max_f": .91, "mae": .026}},
}


def md_rows(md):
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def test_dis_table_layout():
    t = dis_table(DIS, metrics=("max_f", "mae", "hce"))
    rows = md_rows(to_markdown(t))
    assert rows[0] == ["dataset", "metric", "SAM", "HQ-SAM", "Pi-SAM"]
    # dataset order follows the paper (TE1 before VD) whatever the dict order; metric order as asked
    assert [r[0] for r in rows[2:]] == ["DIS-TE1", "", "", "DIS-VD", "", ""]
    assert rows[2][1:] == ["$F_{\\beta}^x$ ↑", "0.755", "0.895", "**0.917**"]
    assert rows[3][2:] == ["0.106", "0.025", "**0.019**"]  # MAE: lower is best
    assert rows[4][2:] == ["206", "**192**", "-"]  # HCE as an integer; missing as "-"
    assert rows[7][2:] == ["**1414**", "1518", "-"]


def test_dis_te_mean():
    res = {"m": {f"DIS5K-TE{i}": {"max_f": 0.1 * i, "mae": 0.01 * i} for i in range(1, 5)}}
    out = add_dis_te_mean(res)
    assert out["m"]["DIS5K-TE(1-4)"] == pytest.approx({"max_f": 0.25, "mae": 0.025})
    assert "DIS5K-TE(1-4)" not in res["m"]  # input untouched
    t = dis_table(out, metrics=("max_f",))
    assert [r.keys[0] for r in t.rows] == ["DIS5K-TE1", "DIS5K-TE2", "DIS5K-TE3", "DIS5K-TE4", "DIS5K-TE(1-4)"]


def test_sod_and_big_tables():
    sod = {"SAM": {"HRSOD-TE": {"s_measure": .932, "max_f": .955, "mean_e": .963, "mae": .022},
                   "UHRSD-TE": {"s_measure": .88, "max_f": .913, "mean_e": .921, "mae": .054}},
           "Pi-SAM": {"HRSOD-TE": {"s_measure": .972, "max_f": .974, "mean_e": .991, "mae": .006}}}
    rows = md_rows(to_markdown(sod_table(sod)))
    assert rows[0][0] == "model" and rows[0][1] == "HRSOD $S_m$ ↑" and rows[0][5] == "UHRSD $S_m$ ↑"
    assert len(rows[0]) == 9
    assert [r[0] for r in rows[2:]] == ["SAM", "Pi-SAM"]
    assert rows[3][1:] == ["**0.972**", "**0.974**", "**0.991**", "**0.006**", "-", "-", "-", "-"]
    big = {"SAM": {"BIG_val": {"iou": .922, "mba": .72}, "BIG_test": {"iou": .69, "mba": .673}},
           "Pi-SAM": {"BIG_test": {"iou": .864, "mba": .766}, "BIG_val": {"iou": .901, "mba": .788}}}
    rows = md_rows(to_markdown(big_table(big)))
    assert rows[0] == ["model", "BIG Test IoU ↑", "BIG Test mBA ↑", "BIG Val IoU ↑", "BIG Val mBA ↑"]
    assert rows[2][1:] == ["0.690", "0.673", "**0.922**", "0.720"]
    assert rows[3][1:] == ["**0.864**", "**0.766**", "0.901", "**0.788**"]


CLICKS = {"SAM": {0: {"max_f": .556, "mae": .246}, 1: {"max_f": .465, "mae": .315}, 5: {"max_f": .358, "mae": .36}},
          "Pi": {"0": {"max_f": .753, "mae": .106}, "1": {"max_f": .805, "mae": .076}, "5": {"max_f": .818, "mae": .069}}}


def test_clicks_table_layout():
    rows = md_rows(to_markdown(clicks_table(CLICKS, metrics=("max_f", "mae"))))
    assert rows[0] == ["points", "metric", "Ori-SAM", "SAM", "Ori-Pi", "Pi"]
    assert [r[0] for r in rows[2:]] == ["1", "", "5", ""]
    # after-click values bold only where they improve on Ori (MAE: lower)
    assert rows[2][2:] == ["0.556", "0.465", "0.753", "**0.805**"]
    assert rows[5][2:] == ["0.246", "0.360", "0.106", "**0.069**"]


def test_click_modes_table_layout():
    res = {"Pi-SAM": {"Ori": {"max_f": .753, "mae": .106}, "ALL": {"max_f": .821, "mae": .062},
                      "BG": {"max_f": .852, "mae": .058}, "FG": {"max_f": .82, "mae": .068}}}
    rows = md_rows(to_markdown(click_modes_table(res, metrics=("max_f", "mae"))))
    assert rows[0] == ["model", "metric", "Ori", "ALL", "BG", "FG"]  # paper Table 7 column order
    assert rows[2] == ["Pi-SAM", "$F_{\\beta}^x$ ↑", "0.753", "0.821", "**0.852**", "0.820"]
    assert rows[3][2:] == ["0.106", "0.062", "**0.058**", "0.068"]


def test_csv_json_round_trip(tmp_path):
    t = dis_table(DIS, metrics=("max_f", "mae", "hce"))
    paths = write_table(t, DIS, tmp_path, "table1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table1.csv", "table1.json", "table1.md"]
    rows = read_csv(paths["csv"])
    assert [(r["dataset"], r["metric"]) for r in rows] == [
        ("DIS5K-TE1", "max_f"), ("DIS5K-TE1", "mae"), ("DIS5K-TE1", "hce"),
        ("DIS5K-VD", "max_f"), ("DIS5K-VD", "mae"), ("DIS5K-VD", "hce")]
    for r in rows:
        for m in ("SAM", "HQ-SAM", "Pi-SAM"):
            assert r[m] == DIS[m][r["dataset"]].get(r["metric"])  # full precision, None when missing
    assert json.loads(paths["json"].read_text()) == DIS
    # click results: integer keys come back as strings; the CSV keeps the numbers exactly
    paths = write_table(clicks_table(CLICKS, metrics=("max_f",)), CLICKS, tmp_path, "table2")
    rows = read_csv(paths["csv"])
    assert rows[1] == {"points": "5", "metric": "max_f", "Ori-SAM": .556, "SAM": .358, "Ori-Pi": .753, "Pi": .818}
    assert json.loads(paths["json"].read_text())["SAM"]["5"] == {"max_f": .358, "mae": .36}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_plot_clicks(tmp_path, monkeypatch):
    from pisam_jax.evaluation import reports

    figures = []
    save = reports._save_figure
    monkeypatch.setattr(reports, "_save_figure", lambda fig, path: figures.append(fig) or save(fig, path))
    path = plot_clicks(CLICKS, tmp_path / "clicks.png", metrics=("max_f", "mae"), dpi=50, num_images=20,
                       datasets=["DIS5K-VD"])
    with Image.open(path) as im:
        assert im.size == (int(4.2 * 2 * 50), int(3.4 * 50))  # 2 panels in one row
    # the caption says what a point averages and which models the lines are
    assert figures[0]._suptitle.get_text().endswith("mean over 20 images of DIS5K-VD; models: SAM, Pi")


def test_gallery(tmp_path):
    """Panels: image with the box (the GT's tight box) and the clicks | prediction | TP / FP / FN colours."""
    from pisam_jax import overlay

    rng = np.random.default_rng(0)
    cases = []
    for i, (h, w) in enumerate([(60, 90), (80, 60)]):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        gt = np.zeros((h, w), np.uint8)
        gt[10:40, 10:40] = 255
        pred = np.roll(gt, 5, axis=1)  # columns 10-14 missed, 15-39 right, 40-44 extra
        for n, a in (("im", img), ("gt", gt), ("pr", pred)):
            Image.fromarray(a).save(tmp_path / f"{n}{i}.png")
        cases.append((f"c{i}", tmp_path / f"im{i}.png", tmp_path / f"gt{i}.png", tmp_path / f"pr{i}.png", 0.5))
    cases[0] += (np.array([[20, 25, 1]]),)  # a foreground click at x 20, y 25
    path = worst_cases_gallery(cases, tmp_path / "g" / "gallery.png", tile=64, title="model on set: 2 of 9 images")
    line_h, cell_w, row_h = max(14, 64 // 16) + 8, 96, 64 + max(14, 64 // 16) + 8 + 4  # widest: 60x90 at 64 high
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB"))
    top = px.shape[0] - 2 * row_h
    assert px.shape[1] == 3 * cell_w + 16 and top >= 4 * line_h and top % line_h == 0  # title, legend, columns
    y0, s = top + line_h, 64 / 60  # the first case's panels: row 0 at y0; image pixels scaled by s

    def panel(j):
        return px[y0:y0 + 64, 4 + j * (cell_w + 4):4 + j * (cell_w + 4) + cell_w]

    third = panel(2)
    assert tuple(third[int(25 * s), int(27 * s)]) == overlay.TRUE_POSITIVE
    assert tuple(third[int(25 * s), int(42.5 * s)]) == overlay.FALSE_POSITIVE
    assert tuple(third[int(25 * s), int(12 * s)]) == overlay.FALSE_NEGATIVE
    first = panel(0)
    assert tuple(first[round(25.5 * s - 0.5), round(20.5 * s - 0.5)]) == overlay.FOREGROUND  # the click
    assert (first[9:13, 26] == overlay.BOX).all(axis=-1).any()  # the box's top edge, y = 10 * s
    assert (panel(1) == overlay.OUTLINE).all(axis=-1).any()  # the prediction outlined
    plain = worst_cases_gallery([c[:5] for c in cases], tmp_path / "plain.png", tile=64)
    with Image.open(plain) as im:  # no title, no clicks (nor their legend): a shorter header
        shorter = px.shape[0] - im.size[1]
        assert im.size[0] == px.shape[1] and shorter >= line_h and shorter % line_h == 0
    with pytest.raises(ValueError):
        worst_cases_gallery([], tmp_path / "x.png")
