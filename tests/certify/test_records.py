"""Tests for stablenet.certify.records: the one JSON Lines result format."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import stablenet.certify.records as records_module
from stablenet.certify.records import (
    ABSTAIN,
    OPTIONAL_RECORD_FIELDS,
    RECORD_FIELDS,
    CertificationRecord,
    RecordWriter,
    read_metadata,
    read_records,
)


def make(index: int, label: int = 1, prediction: int = 1, radius: float = 0.5, **kw) -> CertificationRecord:
    fields = {
        "index": index,
        "label": label,
        "prediction": prediction,
        "radius": radius,
        "correct": prediction == label and prediction != ABSTAIN,
        "method": "lipschitz",
        "norm": "l2",
        "time_s": 0.25,
    }
    fields.update(kw)
    return CertificationRecord(**fields)


def valid_dict(**overrides) -> dict:
    d = make(3).to_dict()
    d.update(overrides)
    return d


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, value in vars(records_module).items()
        if not name.startswith("_")
        and getattr(value, "__module__", records_module.__name__) == records_module.__name__
        and name not in {"annotations", "logger"}
        and not isinstance(value, type(records_module))
    }
    assert set(records_module.__all__) == public


def test_constants():
    assert RECORD_FIELDS == ("index", "label", "prediction", "radius", "correct", "method", "norm", "time_s")
    assert ABSTAIN == -1


def test_dict_round_trip_and_key_order():
    record = make(7, label=2, prediction=5, radius=0.0)
    d = record.to_dict()
    assert list(d) == list(RECORD_FIELDS)
    assert d["correct"] is False
    assert CertificationRecord.from_dict(d) == record


def test_numpy_scalars_are_normalised_to_builtins():
    record = CertificationRecord(
        np.int64(4),
        np.int64(1),
        np.int64(1),
        np.float32(0.5),
        np.bool_(True),
        "smoothing",
        "l2",
        np.float64(1),
    )
    d = record.to_dict()
    assert type(d["index"]) is int and type(d["radius"]) is float and type(d["correct"]) is bool
    assert type(d["time_s"]) is float
    json.dumps(d)  # must be JSON-serialisable


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (valid_dict(extra=1), "unexpected key 'extra'"),
        ({k: v for k, v in valid_dict().items() if k != "radius"}, "missing key 'radius'"),
        (valid_dict(correct=1), "'correct' must be a bool"),
        (valid_dict(index=True), "'index' must be an int"),
        (valid_dict(label=1.0), "'label' must be an int"),
        (valid_dict(radius=-0.1), "'radius' must be a finite number >= 0"),
        (valid_dict(radius=float("nan")), "'radius' must be a finite number >= 0"),
        (valid_dict(radius=float("inf")), "'radius' must be a finite number >= 0"),
        (valid_dict(radius=True), "'radius' must be a finite number"),
        (valid_dict(radius="0.5"), "'radius' must be a finite number"),
        (valid_dict(time_s=-1.0), "'time_s' must be a finite number >= 0"),
        (valid_dict(index=-1), "'index' must be an int >= 0"),
        (valid_dict(prediction=-2, correct=False), "'prediction' must be an int >= -1"),
        (valid_dict(method=""), "'method' must be a non-empty str"),
        (valid_dict(norm=2), "'norm' must be a non-empty str"),
        (valid_dict(prediction=2, correct=True), "'correct' must equal prediction == label"),
        (valid_dict(prediction=1, correct=False), "'correct' must equal prediction == label"),
        (valid_dict(prediction=ABSTAIN, correct=False, radius=0.3), "'radius' must be 0 when prediction"),
    ],
)
def test_from_dict_rejects_invalid_records(d, match):
    with pytest.raises(ValueError, match=match) as info:
        CertificationRecord.from_dict(d)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="must be a JSON object"):
        CertificationRecord.from_dict([1, 2, 3])


def test_abstain_is_never_correct_even_when_label_is_minus_one_like():
    # label must be a class index, so an abstention can't "match" it.
    with pytest.raises(ValueError, match="'label' must be an int >= 0"):
        make(0, label=ABSTAIN, prediction=ABSTAIN, radius=0.0, correct=True)
    abstained = make(0, label=3, prediction=ABSTAIN, radius=0.0)
    assert abstained.correct is False and abstained.abstained


def test_record_is_frozen():
    record = make(0)
    with pytest.raises(AttributeError):
        record.radius = 2.0


def test_optional_smoothed_classifier_fields_round_trip_and_old_records_still_load(tmp_path):
    assert OPTIONAL_RECORD_FIELDS == ("simplex_map", "inverse_temperature")
    soft = make(0, method="lvm-rs", simplex_map="sparsemax", inverse_temperature=np.float64(4))
    hard = make(1, method="cpm", simplex_map="argmax")
    old = make(2, method="lvm-rs")
    assert list(soft.to_dict()) == [*RECORD_FIELDS, *OPTIONAL_RECORD_FIELDS]
    assert type(soft.to_dict()["inverse_temperature"]) is float
    assert list(hard.to_dict()) == [*RECORD_FIELDS, "simplex_map"]
    assert list(old.to_dict()) == list(RECORD_FIELDS)  # unset optional keys are not written
    for record in (soft, hard, old):
        assert CertificationRecord.from_dict(record.to_dict()) == record
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([soft, hard, old])
    lines = path.read_text().splitlines()
    assert lines[0].endswith(',"time_s":0.25,"simplex_map":"sparsemax","inverse_temperature":4.0}')
    assert lines[2].endswith(',"time_s":0.25}')
    assert read_records(path) == [soft, hard, old]
    assert CertificationRecord.from_dict(valid_dict(simplex_map="argmax", inverse_temperature=None)).simplex_map


@pytest.mark.parametrize(
    ("d", "match"),
    [
        (valid_dict(inverse_temperature=2.0), "'inverse_temperature' needs 'simplex_map'"),
        (
            valid_dict(simplex_map="softmax", inverse_temperature=0.0),
            "'inverse_temperature' must be a finite number > 0",
        ),
        (
            valid_dict(simplex_map="softmax", inverse_temperature=-1),
            "'inverse_temperature' must be a finite number > 0",
        ),
        (valid_dict(simplex_map="softmax", inverse_temperature=True), "'inverse_temperature' must be a finite number"),
        (valid_dict(simplex_map="softmax", inverse_temperature=float("inf")), "'inverse_temperature' must be"),
        (valid_dict(simplex_map=""), "'simplex_map' must be a non-empty str"),
        (valid_dict(simplex_map=1), "'simplex_map' must be a non-empty str"),
        (
            valid_dict(temperature=1.0),
            "unexpected key 'temperature'; .* and optionally simplex_map, inverse_temperature",
        ),
    ],
)
def test_invalid_optional_fields_are_rejected(d, match):
    with pytest.raises(ValueError, match=match) as info:
        CertificationRecord.from_dict(d)
    assert "\n" not in str(info.value)


def test_written_lines_are_compact_and_ordered(tmp_path):
    path = tmp_path / "sub" / "dir" / "run.jsonl"  # parent directories are created
    with RecordWriter(path) as writer:
        assert writer.done == set()
        assert writer.write([make(0), make(1, prediction=ABSTAIN, radius=0.0)]) == 2
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0] == (
        '{"index":0,"label":1,"prediction":1,"radius":0.5,"correct":true,'
        '"method":"lipschitz","norm":"l2","time_s":0.25}'
    )
    for line in lines:
        assert list(json.loads(line)) == list(RECORD_FIELDS)
    assert path.read_text().endswith("\n")


def test_round_trip_through_file_sorted_by_index(tmp_path):
    path = tmp_path / "run.jsonl"
    written = [make(5, radius=1.25), make(2, label=0, prediction=3, radius=0.0), make(9)]
    with RecordWriter(path) as writer:
        writer.write(written)
    assert read_records(path) == sorted(written, key=lambda r: r.index)


def test_resume_sees_done_indices_and_appends(tmp_path):
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1)])
        assert writer.done == {0, 1}
    with RecordWriter(path) as writer:
        assert writer.done == {0, 1}
        writer.write(make(2))  # a single record is accepted too
        assert writer.done == {0, 1, 2}
    assert [r.index for r in read_records(path)] == [0, 1, 2]


def test_duplicate_index_raises_and_leaves_file_unchanged(tmp_path):
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1)])
        before = path.read_bytes()
        with pytest.raises(ValueError, match="index 1 is already in"):
            writer.write([make(2), make(1)])
        with pytest.raises(ValueError, match="index 3 is already in"):
            writer.write([make(3), make(3)])  # duplicated within one batch
        assert path.read_bytes() == before
        assert writer.done == {0, 1}
    with RecordWriter(path) as writer, pytest.raises(ValueError, match="index 0 is already in"):
        writer.write([make(0)])  # duplicate of a record from a previous run


def test_write_rejects_non_records_and_closed_writer(tmp_path):
    writer = RecordWriter(tmp_path / "run.jsonl")
    with pytest.raises(RuntimeError, match="not open"):
        writer.write([make(0)])
    with writer, pytest.raises(TypeError, match="accepts CertificationRecord"):
        writer.write([make(0).to_dict()])
    assert writer.closed


def _torn_file(path):
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1), make(2)])
    full = path.read_bytes()
    # Simulate a writer killed in the middle of the last line.
    path.write_bytes(full[: full.rindex(b'"method"')])
    return full


def test_torn_last_line_is_dropped_on_resume(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    full = _torn_file(path)
    with caplog.at_level(logging.WARNING, logger="stablenet.certify.records"):
        with RecordWriter(path) as writer:
            assert writer.done == {0, 1}
            writer.write([make(2, radius=0.75)])
    assert any("truncated last line" in message for message in caplog.messages)
    # Every line of the repaired file is a valid record, and only the torn one was lost.
    lines = path.read_bytes().splitlines()
    assert lines[:2] == full.splitlines()[:2]
    assert [CertificationRecord.from_dict(json.loads(line)).index for line in lines] == [0, 1, 2]
    assert read_records(path)[-1].radius == 0.75


def test_read_records_ignores_torn_last_line_without_modifying(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    _torn_file(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="stablenet.certify.records"):
        assert [r.index for r in read_records(path)] == [0, 1]
    assert caplog.messages
    assert path.read_bytes() == before


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1)])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with RecordWriter(path) as writer:
        assert writer.done == {0, 1}
        writer.write([make(2)])
    assert [r.index for r in read_records(path)] == [0, 1, 2]


def test_bad_middle_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1), make(2)])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"run\.jsonl:2: not a valid JSON line"):
        read_records(path)
    with pytest.raises(ValueError, match=r"run\.jsonl:2: not a valid JSON line"):
        RecordWriter(path).open()
    assert path.read_bytes() == before  # never damaged


def test_invalid_record_on_last_line_is_not_treated_as_torn(tmp_path):
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0)])
    with path.open("a") as f:
        f.write(json.dumps(valid_dict(index=1, extra=True)) + "\n")
    with pytest.raises(ValueError, match=r"run\.jsonl:2: record has unexpected key 'extra'"):
        read_records(path)


def test_duplicate_index_in_file_raises(tmp_path):
    path = tmp_path / "run.jsonl"
    line = make(4).to_json()
    path.write_text(line + "\n" + make(5).to_json() + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"run\.jsonl:3: duplicate index 4 \(first at line 1\)"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="record file not found"):
        read_records(tmp_path / "nope.jsonl")
    assert read_metadata(tmp_path / "nope.jsonl") == {}


def test_metadata_sidecar_written_merged_and_checked(tmp_path):
    path = tmp_path / "run.jsonl"
    sidecar = tmp_path / "run.jsonl.meta.json"
    with RecordWriter(path, metadata={"dataset": "digits", "sigma": 0.25}) as writer:
        writer.write([make(0)])
    assert json.loads(sidecar.read_text()) == {"dataset": "digits", "sigma": 0.25}
    assert read_metadata(path) == {"dataset": "digits", "sigma": 0.25}

    with RecordWriter(path, metadata={"dataset": "digits", "model": "sll_s"}):
        pass
    assert read_metadata(path) == {"dataset": "digits", "sigma": 0.25, "model": "sll_s"}

    with RecordWriter(path):  # no metadata: sidecar untouched
        pass
    assert read_metadata(path)["model"] == "sll_s"

    before = path.read_bytes()
    with pytest.raises(ValueError, match="dataset 'digits'; refusing to add records for dataset 'mnist'"):
        RecordWriter(path, metadata={"dataset": "mnist"}).open()
    assert read_metadata(path)["dataset"] == "digits"
    assert path.read_bytes() == before
    # what the records certify cannot change on resume either (a record file is one experiment)
    with pytest.raises(ValueError, match=r"sigma 0\.25; refusing to add records for sigma 0\.5"):
        RecordWriter(path, metadata={"dataset": "digits", "sigma": 0.5}).open()
    with RecordWriter(path, metadata={"arithmetic": "float64"}):
        pass
    with pytest.raises(ValueError, match="arithmetic 'float64'; refusing to add records for arithmetic 'native'"):
        RecordWriter(path, metadata={"arithmetic": "native"}).open()
    assert path.read_bytes() == before


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        RecordWriter(tmp_path / "run.jsonl", metadata={"x": object()}).open()
    (tmp_path / "bad.jsonl.meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="metadata must be a JSON object"):
        read_metadata(tmp_path / "bad.jsonl")


def test_open_twice_raises(tmp_path):
    with RecordWriter(tmp_path / "run.jsonl") as writer, pytest.raises(RuntimeError, match="already open"):
        writer.open()


def test_each_write_is_flushed_and_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = records_module.os.fsync
    monkeypatch.setattr(records_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "run.jsonl"
    with RecordWriter(path) as writer:
        writer.write([make(0), make(1)])
        assert len(synced) == 1
        # Visible to a reader while the writer is still open (flushed, not buffered).
        assert [r.index for r in read_records(path)] == [0, 1]
        writer.write([])
        assert len(synced) == 1  # nothing to write, nothing to sync
