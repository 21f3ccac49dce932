"""Tests for stablenet.workflows.report: certified accuracy, ACR, the Markdown report and the plot."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import stablenet.certify.records as records_module
import stablenet.workflows.report as report_module
from stablenet.certify.records import ABSTAIN, CertificationRecord, RecordWriter
from stablenet.workflows.report import (
    STANDARD_RADII,
    average_certified_radius,
    certified_accuracy,
    summarize,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(index, label, prediction, radius, time_s=0.01, method="lipschitz"):
    correct = prediction == label and prediction != ABSTAIN
    return CertificationRecord(index, label, prediction, radius, correct, method, "l2", time_s)


# Five examples, computed by hand below:
#   0: correct, radius 0      (correct but not certified)
#   1: correct, radius 0.5
#   2: correct, radius 1.2
#   3: wrong,   radius 2.0    (certified, but certified wrong: never counts)
#   4: abstain
HAND = [
    rec(0, 0, 0, 0.0, 0.01),
    rec(1, 1, 1, 0.5, 0.02),
    rec(2, 2, 2, 1.2, 0.03),
    rec(3, 3, 0, 2.0, 0.04),
    rec(4, 1, ABSTAIN, 0.0, 0.05),
]


def write_run(path, records, dataset=None):
    metadata = None if dataset is None else {"dataset": dataset}
    with RecordWriter(path, metadata=metadata) as writer:
        writer.write(records)
    return path


def table_rows(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, value in vars(report_module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", report_module.__name__) == report_module.__name__
        and name not in {"annotations", "logger"}
        and not isinstance(value, type(report_module))
        and vars(records_module).get(name) is not value  # imported from records
    }
    assert set(report_module.__all__) == public


def test_standard_radii():
    assert STANDARD_RADII["digits"] == (0.25, 0.5, 1.0, 1.5)
    assert STANDARD_RADII["mnist"] == STANDARD_RADII["fashion-mnist"] == (0.5, 1.0, 1.58, 2.0)
    assert STANDARD_RADII["cifar10"] == STANDARD_RADII["cifar100"]
    np.testing.assert_allclose(np.array(STANDARD_RADII["cifar10"]) * 255, [36, 72, 108, 255])


def test_certified_accuracy_by_hand():
    radii = [0.0, 0.25, 0.5, 1.0, 1.2, 1.5, 2.0]
    expected = [3 / 5, 2 / 5, 2 / 5, 1 / 5, 1 / 5, 0.0, 0.0]
    np.testing.assert_allclose(certified_accuracy(HAND, radii), expected)
    assert certified_accuracy(HAND, 0.5).tolist() == [2 / 5]
    assert certified_accuracy(HAND, radii).dtype == np.float64


def test_certified_accuracy_is_nonincreasing_in_radius():
    rng = np.random.default_rng(0)
    records = [rec(i, int(rng.integers(3)), int(rng.integers(3)), float(rng.exponential())) for i in range(200)]
    radii = np.linspace(0, 4, 50)
    acc = certified_accuracy(records, radii)
    assert np.all(np.diff(acc) <= 0)
    assert acc[0] == pytest.approx(np.mean([r.correct for r in records]))


def test_certified_accuracy_errors():
    with pytest.raises(ValueError, match="non-empty"):
        certified_accuracy([], [0.5])
    with pytest.raises(ValueError, match=r"^radius must be >= 0; got -0\.1$"):
        certified_accuracy(HAND, [0.5, -0.1])
    with pytest.raises(ValueError, match="radius must be >= 0; got nan"):
        certified_accuracy(HAND, [float("nan")])
    with pytest.raises(TypeError, match="CertificationRecord"):
        certified_accuracy([{"radius": 1.0}], [0.5])


def test_average_certified_radius_by_hand():
    assert average_certified_radius(HAND) == pytest.approx((0.0 + 0.5 + 1.2) / 5)
    with pytest.raises(ValueError, match="non-empty"):
        average_certified_radius([])


def test_acr_is_area_under_certified_accuracy_curve():
    rng = np.random.default_rng(1)
    records = [rec(i, i % 2, int(rng.integers(2)), float(rng.uniform(0, 3))) for i in range(50)]
    grid = np.linspace(0, 3, 30001)
    acc = certified_accuracy(records, grid)
    area = float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(grid)))
    assert area == pytest.approx(average_certified_radius(records), abs=1e-3)


def test_summarize_records_and_path(tmp_path):
    s = summarize(HAND, [0.5, 1.0])
    assert s["n"] == 5
    assert s["clean_accuracy"] == pytest.approx(0.6)
    assert s["radii"] == [0.5, 1.0]
    assert s["certified_accuracy"] == pytest.approx([0.4, 0.2])
    assert s["acr"] == pytest.approx(0.34)
    assert s["abstain_rate"] == pytest.approx(0.2)
    assert s["mean_time_s"] == pytest.approx(0.03)
    assert s["methods"] == ["lipschitz"] and s["norms"] == ["l2"]
    assert s["dataset"] is None

    path = write_run(tmp_path / "run.jsonl", HAND, dataset="digits")
    s = summarize(path)  # radii from the sidecar's dataset
    assert s["dataset"] == "digits"
    assert s["radii"] == [0.25, 0.5, 1.0, 1.5]
    assert s["certified_accuracy"] == pytest.approx([0.4, 0.4, 0.2, 0.0])


def test_step_curve_matches_certified_accuracy():
    rng = np.random.default_rng(2)
    records = [rec(i, i % 3, int(rng.integers(3)), float(np.round(rng.uniform(0, 2), 1))) for i in range(40)]
    records.append(rec(40, 0, 0, 0.0))  # a correct, uncertified example: a drop right at 0
    xs, ys = report_module.step_curve(records, 2.5)
    assert xs[0] == 0.0 and xs[-1] == 2.5 and np.all(np.diff(xs) >= 0)
    assert ys[0] == pytest.approx(100 * certified_accuracy(records, [0.0])[0])
    # Axes.step(where="post") draws ys[i] on (xs[i], xs[i + 1]).
    checked = 0
    for i in range(len(xs) - 1):
        if xs[i + 1] > xs[i]:
            mid = (xs[i] + xs[i + 1]) / 2
            assert ys[i] == pytest.approx(100 * certified_accuracy(records, [mid])[0]), mid
            checked += 1
    assert checked >= 10


def test_report_contents_digits(tmp_path):
    path = write_run(tmp_path / "lip.jsonl", HAND)
    out = write_report([path], tmp_path / "out", dataset="digits")
    assert out == tmp_path / "out" / "report.md"
    text = out.read_text()
    assert text.startswith("# ")
    assert "| name | method | n | clean acc (%) | ε=0.25 | ε=0.5 | ε=1 | ε=1.5 | ACR | time / example |" in text
    assert "| lip | lipschitz | 5 | 60.0 | 40.0 | 40.0 | 20.0 | 0.0 | 0.340 | 30 ms |" in text
    assert "standard radii for `digits`" in text
    assert "![Certified accuracy vs radius](certified_accuracy.png)" in text
    assert len(table_rows(text)) == 2  # header + one file


def test_report_png_is_valid(tmp_path):
    import matplotlib.image

    path = write_run(tmp_path / "lip.jsonl", HAND)
    write_report([path], tmp_path / "out", dataset="digits")
    png = tmp_path / "out" / "certified_accuracy.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave no temporaries


def test_report_does_not_import_pyplot(tmp_path):
    path = write_run(tmp_path / "lip.jsonl", HAND)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    write_report([path], tmp_path / "out")
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_report_cifar_radii_from_sidecar(tmp_path):
    records = [
        rec(0, 0, 0, 36 / 255),
        rec(1, 1, 1, 0.5),
        rec(2, 2, 2, 1.0),
        rec(3, 3, 1, 0.9),
    ]
    path = write_run(tmp_path / "cifar_run.jsonl", records, dataset="cifar10")
    text = write_report([path], tmp_path / "out").read_text()  # dataset from the sidecar
    assert "| ε=36/255 | ε=72/255 | ε=108/255 | ε=1 |" in text
    assert "`cifar10`" in text
    # CA: 36/255 -> 3/4 (inclusive), 72/255 and 108/255 -> 2/4, 1 -> 1/4; ACR = (36/255 + 0.5 + 1) / 4.
    assert "| cifar_run | lipschitz | 4 | 75.0 | 75.0 | 50.0 | 50.0 | 25.0 | 0.410 |" in text


def test_report_two_files_overlaid(tmp_path):
    a = write_run(tmp_path / "a" / "records.jsonl", HAND, dataset="mnist")
    smoothed = [rec(i, 1, 1, 1.0 + i, time_s=2.0, method="smoothing") for i in range(3)]
    b = write_run(tmp_path / "b" / "records.jsonl", smoothed, dataset="mnist")
    out = write_report([a, b], tmp_path / "out")
    text = out.read_text()
    rows = table_rows(text)
    assert len(rows) == 3
    assert "| ε=0.5 | ε=1 | ε=1.58 | ε=2 |" in rows[0]
    # Same file name in two directories: the names are qualified by the directory.
    assert rows[1].startswith("| a/records | lipschitz | 5 | 60.0 | 40.0 | 20.0 | 0.0 | 0.0 | 0.340 |")
    assert rows[2] == "| b/records | smoothing | 3 | 100.0 | 100.0 | 100.0 | 66.7 | 66.7 | 2.000 | 2.00 s |"
    png = (tmp_path / "out" / "certified_accuracy.png").read_bytes()
    assert png[:8] == PNG_MAGIC

    named = write_report([a, b], tmp_path / "named", names=["SLL", "Cohen"]).read_text()
    assert [row.split(" | ")[0] for row in table_rows(named)[1:]] == ["| SLL", "| Cohen"]


def test_report_explicit_radii(tmp_path):
    path = write_run(tmp_path / "lip.jsonl", HAND, dataset="digits")
    text = write_report([path], tmp_path / "out", radii=[0.5, 2.0]).read_text()
    assert "| ε=0.5 | ε=2 |" in text
    assert "| 60.0 | 40.0 | 0.0 |" in text
    assert "given explicitly" in text


def test_report_auto_radii_without_dataset(tmp_path):
    path = write_run(tmp_path / "lip.jsonl", HAND)
    text = write_report([path], tmp_path / "out").read_text()
    # Largest certified radius of a correct record: 1.2 -> 0.3, 0.6, 0.9, 1.2.
    assert "| ε=0.3 | ε=0.6 | ε=0.9 | ε=1.2 |" in text
    assert "no data set given" in text
    assert "| lip | lipschitz | 5 | 60.0 | 40.0 | 20.0 | 20.0 | 20.0 |" in text


def test_auto_radii_round_down():
    records = [rec(0, 0, 0, 1.237)]
    assert report_module._auto_radii(records) == (0.3, 0.61, 0.92, 1.23)
    assert report_module._auto_radii([rec(0, 0, 0, 0.004)]) == (0.001, 0.002, 0.003, 0.004)
    assert report_module._auto_radii([rec(0, 0, 1, 3.0)]) == (0.0,)


def test_format_radius():
    fmt = report_module.format_radius
    assert [fmt(r) for r in STANDARD_RADII["cifar10"]] == ["36/255", "72/255", "108/255", "1"]
    assert [fmt(r) for r in (0.25, 0.5, 1.0, 1.58, 0.0)] == ["0.25", "0.5", "1", "1.58", "0"]


def test_disagreeing_datasets_raise(tmp_path):
    a = write_run(tmp_path / "a.jsonl", HAND, dataset="mnist")
    b = write_run(tmp_path / "b.jsonl", HAND, dataset="cifar10")
    with pytest.raises(ValueError, match="must share one dataset") as info:
        write_report([a, b], tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="disagrees with the record files' sidecar dataset"):
        write_report([a], tmp_path / "out", dataset="digits")
    assert not (tmp_path / "out").exists()


def test_report_input_errors(tmp_path):
    good = write_run(tmp_path / "good.jsonl", HAND)
    with pytest.raises(FileNotFoundError, match=r"record file not found: .*missing\.jsonl"):
        write_report([good, tmp_path / "missing.jsonl"], tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no records"):
        write_report([empty], tmp_path / "out")
    with pytest.raises(ValueError, match=r"^radius must be >= 0; got -0\.1$"):
        write_report([good], tmp_path / "out", radii=[0.5, -0.1])
    with pytest.raises(ValueError, match="names must have one entry per record file"):
        write_report([good], tmp_path / "out", names=["a", "b"])
    with pytest.raises(ValueError, match="at least one record file"):
        write_report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dataset_falls_back_to_auto_radii(tmp_path):
    path = write_run(tmp_path / "lip.jsonl", HAND, dataset="my-data")
    text = write_report([path], tmp_path / "out").read_text()
    assert "no standard radii for data set `my-data`" in text
    assert re.search(r"\| ε=0\.3 \| ε=0\.6 \| ε=0\.9 \| ε=1\.2 \|", text)
