"""One result format for every certifier: one JSON Lines record per test example.

Every certifier (Lipschitz margins, randomized smoothing, ...) appends one :class:`CertificationRecord` per
example to a ``.jsonl`` file through a :class:`RecordWriter`; reports and plots
(:mod:`stablenet.workflows.report`) are made from those files alone, never by re-running a certifier.

A record has the keys of :data:`RECORD_FIELDS`, written in that order, one compact JSON object per line::

    {"index":0,"label":7,"prediction":7,"radius":0.83,"correct":true,"method":"lipschitz","norm":"l2","time_s":0.01}

``prediction == ABSTAIN`` means the certifier abstained; ``radius == 0`` means the prediction is not
certified. Data-set level facts (data set name, model, noise level ...) go into a sidecar
``<path>.meta.json`` rather than into every line.

A randomized certifier that smooths a *simplex map* of the logits (``lvm-rs``, ``cpm``) also writes the keys of
:data:`OPTIONAL_RECORD_FIELDS` after those of :data:`RECORD_FIELDS`: which smoothed classifier this example's
certificate is about (LVM-RS chooses it per example). Files written before these keys existed load unchanged;
a record without them writes exactly :data:`RECORD_FIELDS`.

# Note [torn last line]
A certification run may be killed at any moment. Each batch of records is appended with one ``write``
followed by ``flush`` and ``os.fsync``, so a kill can only leave a *truncated last line*: a prefix of a JSON
object, which never parses (the closing ``}`` is its last character). Such a line is dropped, with a
warning, when the file is read or reopened for resuming. An unparseable line anywhere *else* cannot come
from a killed writer, so it is an error: we never silently drop data that was once complete.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from stablenet.abstain import ABSTAIN
from stablenet.atomic import atomic_write_bytes, atomic_write_json

__all__ = [
    "ABSTAIN",
    "IDENTITY_KEYS",
    "OPTIONAL_RECORD_FIELDS",
    "RECORD_FIELDS",
    "CertificationRecord",
    "RecordWriter",
    "read_metadata",
    "read_records",
]

logger = logging.getLogger(__name__)

RECORD_FIELDS: tuple[str, ...] = (
    "index",
    "label",
    "prediction",
    "radius",
    "correct",
    "method",
    "norm",
    "time_s",
)
"""The keys every record has, in the order they are written."""

OPTIONAL_RECORD_FIELDS: tuple[str, ...] = ("simplex_map", "inverse_temperature")
"""Keys a record may add after :data:`RECORD_FIELDS`, in this order, written only when set (not ``None``)."""


_META_SUFFIX = ".meta.json"
_KEYS_HINT = (
    "a record has the keys " + ", ".join(RECORD_FIELDS) + " and optionally " + ", ".join(OPTIONAL_RECORD_FIELDS)
)


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"record field {key!r} must be an int >= {minimum} (not a bool); got {value!r}")
    if value < minimum:
        raise ValueError(f"record field {key!r} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _check_nonnegative_float(key: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"record field {key!r} must be a finite number >= 0 (not a bool); got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"record field {key!r} must be a finite number >= 0; got {value!r}")
    return value


def _check_str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"record field {key!r} must be a non-empty str; got {value!r}")
    return value


@dataclass(frozen=True)
class CertificationRecord:
    """The certification result for one test example.

    Attributes:
        index: Position of the example in the evaluated data set (``>= 0``); unique within a file.
        label: True class (``>= 0``).
        prediction: Predicted class (``>= 0``), or :data:`ABSTAIN`.
        radius: Certified radius (finite, ``>= 0``) in the ``norm`` given: the prediction is guaranteed
            constant on the ball of that radius around the input. ``0`` means not certified; an abstention
            always has radius ``0``.
        correct: Whether ``prediction == label``; must agree with them (an abstention is never correct).
        method: Name of the certifier, e.g. ``"lipschitz"`` or ``"smoothing"``.
        norm: Norm of the radius, e.g. ``"l2"``.
        time_s: Wall-clock seconds spent certifying this example (finite, ``>= 0``).
        simplex_map: Optional (``None``: not recorded). For a randomized certificate, the map of the logits
            whose Gaussian average was smoothed: ``"softmax"`` or ``"sparsemax"`` (a soft smoothed classifier,
            argmax over classes of E[map(s * logits(x + noise))]), or ``"argmax"`` (Cohen's hard votes).
        inverse_temperature: Optional: the finite ``s > 0`` that scales the logits before ``simplex_map``;
            ``None`` for ``"argmax"``, whose votes do not depend on it. Only together with ``simplex_map``.

    Integer and float fields accept NumPy scalars and store them as built-in ``int``/``float``, so that
    :meth:`to_dict` is always JSON-serialisable. Invalid values raise a one-line :class:`ValueError`
    naming the field.

    Example:
        >>> r = CertificationRecord(0, label=3, prediction=3, radius=0.5, correct=True,
        ...                         method="lipschitz", norm="l2", time_s=0.01)
        >>> CertificationRecord.from_dict(r.to_dict()) == r
        True
    """

    index: int
    label: int
    prediction: int
    radius: float
    correct: bool
    method: str
    norm: str
    time_s: float
    simplex_map: str | None = None
    inverse_temperature: float | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise NumPy scalars to built-ins through object.__setattr__.
        values = {
            "index": _check_int("index", self.index, 0),
            "label": _check_int("label", self.label, 0),
            "prediction": _check_int("prediction", self.prediction, ABSTAIN),
            "radius": _check_nonnegative_float("radius", self.radius),
            "method": _check_str("method", self.method),
            "norm": _check_str("norm", self.norm),
            "time_s": _check_nonnegative_float("time_s", self.time_s),
        }
        if not isinstance(self.correct, (bool, np.bool_)):
            raise ValueError(f"record field 'correct' must be a bool (true/false); got {self.correct!r}")
        values["correct"] = bool(self.correct)
        if self.simplex_map is not None:
            values["simplex_map"] = _check_str("simplex_map", self.simplex_map)
        if self.inverse_temperature is not None:
            if self.simplex_map is None:
                raise ValueError(
                    "record field 'inverse_temperature' needs 'simplex_map' (the map whose input it scales); "
                    f"got inverse_temperature={self.inverse_temperature!r} with simplex_map=None"
                )
            s = self.inverse_temperature
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real) or not (0 < s < math.inf):
                raise ValueError(f"record field 'inverse_temperature' must be a finite number > 0 or null; got {s!r}")
            values["inverse_temperature"] = float(s)
        for key, value in values.items():
            object.__setattr__(self, key, value)

        expected = self.prediction != ABSTAIN and self.prediction == self.label
        if self.correct != expected:
            raise ValueError(
                "record field 'correct' must equal prediction == label (false for an abstention); "
                f"got correct={self.correct} with prediction={self.prediction}, label={self.label}"
            )
        if self.prediction == ABSTAIN and self.radius != 0.0:
            raise ValueError(
                f"record field 'radius' must be 0 when prediction is ABSTAIN ({ABSTAIN}); got {self.radius!r}"
            )

    @property
    def abstained(self) -> bool:
        """Whether the certifier abstained on this example."""
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a plain dict: the keys of :data:`RECORD_FIELDS`, then those of
        :data:`OPTIONAL_RECORD_FIELDS` that are set, in order."""
        d = {key: getattr(self, key) for key in RECORD_FIELDS}
        d.update({key: getattr(self, key) for key in OPTIONAL_RECORD_FIELDS if getattr(self, key) is not None})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CertificationRecord:
        """Build a record from a mapping with the keys of :data:`RECORD_FIELDS` and any of
        :data:`OPTIONAL_RECORD_FIELDS`.

        Raises:
            TypeError: If ``d`` is not a mapping.
            ValueError: If a key is missing or unexpected, or a value has the wrong type or range (the
                message names the key and what is accepted).
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"a record must be a JSON object/mapping; got {type(d).__name__}")
        missing = [key for key in RECORD_FIELDS if key not in d]
        if missing:
            raise ValueError(f"record is missing key {missing[0]!r}; {_KEYS_HINT}")
        extra = [key for key in d if key not in RECORD_FIELDS and key not in OPTIONAL_RECORD_FIELDS]
        if extra:
            raise ValueError(f"record has unexpected key {extra[0]!r}; {_KEYS_HINT}")
        if not isinstance(d["correct"], bool):
            # Stricter than the constructor: in a file, `correct` must be a JSON true/false, not 0/1.
            raise ValueError(f"record field 'correct' must be a bool (true/false); got {d['correct']!r}")
        return cls(**{key: d[key] for key in (*RECORD_FIELDS, *OPTIONAL_RECORD_FIELDS) if key in d})

    def to_json(self) -> str:
        """Return the record as one compact JSON line (without the newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)


#: Sidecar keys that say what the records certify: a resumed file must keep them (one file, one experiment).
IDENTITY_KEYS = ("dataset", "split", "method", "form", "arithmetic", "sigma", "n0", "n", "alpha", "noise", "levels")


def _metadata_path(path: Path) -> Path:
    return path.with_name(path.name + _META_SUFFIX)


def _scan(path: Path) -> tuple[list[CertificationRecord], list[bytes], bool]:
    """Parse a record file (see Note [torn last line]).

    Returns:
        The records in file order, the raw bytes of their lines (without newlines), and whether the file
        needs rewriting to be appendable (a torn last line was dropped, or the last line lacks its newline).
    """
    data = path.read_bytes()
    raw_lines = data.split(b"\n")
    nonblank = [i for i, raw in enumerate(raw_lines) if raw.strip()]
    last = nonblank[-1] if nonblank else -1
    records: list[CertificationRecord] = []
    kept: list[bytes] = []
    first_line: dict[int, int] = {}
    torn = False
    for i in nonblank:
        raw, lineno = raw_lines[i], i + 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if i == last:
                logger.warning("%s:%d: dropping a truncated last line (a killed writer?): %r", path, lineno, raw[:80])
                torn = True
                continue
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(
                f"{path}:{lineno}: not a valid JSON line ({reason}); only the last line may be truncated, "
                "so this file is damaged: fix or remove that line"
            ) from None
        try:
            record = CertificationRecord.from_dict(obj)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
        if record.index in first_line:
            raise ValueError(
                f"{path}:{lineno}: duplicate index {record.index} (first at line "
                f"{first_line[record.index]}); each index may appear once"
            )
        first_line[record.index] = lineno
        records.append(record)
        kept.append(raw)
    needs_rewrite = torn or (bool(kept) and not data.endswith(b"\n"))
    return records, kept, needs_rewrite


def read_records(path: str | os.PathLike) -> list[CertificationRecord]:
    """Read all records of a JSON Lines file, sorted by index.

    A truncated last line (a killed writer) is ignored with a warning, without modifying the file; any
    other bad line raises (see Note [torn last line]).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On an unparseable line other than the last, an invalid record or a duplicate index;
            the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file not found: {path}")
    records, _, _ = _scan(path)
    return sorted(records, key=lambda r: r.index)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Return the sidecar metadata ``<path>.meta.json`` of a record file, or ``{}`` if there is none.

    Raises:
        ValueError: If the sidecar is not a JSON object.
    """
    meta_path = _metadata_path(Path(path))
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: metadata must be a JSON object; got invalid JSON ({err.msg})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: metadata must be a JSON object; got {type(meta).__name__}")
    return meta


class RecordWriter:
    """Append :class:`CertificationRecord` s to a JSON Lines file, resuming where a previous run stopped.

    Use it as a context manager. On entry the parent directories are created and existing records are
    read: :attr:`done` holds their indices, so a resumed run can skip them. A truncated last line left by
    a killed writer is dropped by atomically rewriting the file without it (with a warning); any other bad
    line raises rather than damage data (see Note [torn last line]). Each :meth:`write` appends one
    compact JSON object per line and then flushes and ``fsync`` s.

    Args:
        path: The ``.jsonl`` file.
        metadata: Optional JSON-serialisable facts about the run (``dataset``, ``model``, ``sigma`` ...),
            merged into the sidecar ``<path>.meta.json`` (written atomically). If the sidecar already
            names a different value for one of :data:`IDENTITY_KEYS` (``dataset``, ``method``, ``sigma`` ...),
            opening raises :class:`ValueError`: one file, one experiment.

    Example:
        >>> with RecordWriter("runs/cert/lipschitz.jsonl", metadata={"dataset": "digits"}) as writer:
        ...     todo = [i for i in range(len(test_set)) if i not in writer.done]
        ...     writer.write(certify(model, test_set, todo))
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict or None; got {type(metadata).__name__}")
        self.path = Path(path)
        self.metadata_path = _metadata_path(self.path)
        self.metadata = dict(metadata) if metadata is not None else None
        # Indices already in the file: read on open, updated by write(). A plain set, so that
        # `i in writer.done` is O(1) in a loop over the data set; callers must not modify it.
        self.done: set[int] = set()
        self._file: Any = None

    @property
    def closed(self) -> bool:
        """Whether the writer is not open."""
        return self._file is None

    def open(self) -> RecordWriter:
        """Check the metadata, read existing records, and open the file for appending; returns ``self``.

        Raises:
            RuntimeError: If already open.
            ValueError: If the sidecar names another data set (or method, noise level ...: :data:`IDENTITY_KEYS`),
                or the existing file is damaged.
        """
        if self._file is not None:
            raise RuntimeError(f"RecordWriter for {self.path} is already open")
        if self.metadata is not None:
            self._update_metadata(self.metadata)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = set()
        if self.path.exists():
            records, kept, needs_rewrite = _scan(self.path)
            if needs_rewrite:
                atomic_write_bytes(self.path, b"".join(raw + b"\n" for raw in kept))
            self.done = {r.index for r in records}
            if records:
                logger.info("%s: resuming after %d existing records", self.path, len(records))
        self._file = open(self.path, "ab")
        return self

    def _update_metadata(self, metadata: dict[str, Any]) -> None:
        existing = read_metadata(self.path)
        for key in IDENTITY_KEYS:
            old, new = existing.get(key), metadata.get(key)
            if old is not None and new is not None and old != new:
                raise ValueError(
                    f"{self.path} holds records for {key} {old!r}; refusing to add records for {key} "
                    f"{new!r} (use another file)"
                )
        merged = {**existing, **metadata}
        try:
            json.dumps(merged)
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata must be JSON-serialisable; {err}") from None
        if merged != existing or not self.metadata_path.exists():
            atomic_write_json(self.metadata_path, merged)

    def write(self, records: Iterable[CertificationRecord] | CertificationRecord) -> int:
        """Append records (one JSON line each), then flush and ``fsync``; returns how many were written.

        All records are checked before anything is written, so a rejected batch leaves the file unchanged.

        Raises:
            RuntimeError: If the writer is not open.
            TypeError: If an item is not a :class:`CertificationRecord`.
            ValueError: If an index is already in the file or repeated within the batch.
        """
        if self._file is None:
            raise RuntimeError(
                f"RecordWriter for {self.path} is not open; use it as 'with RecordWriter(path) as writer:'"
            )
        if isinstance(records, CertificationRecord):
            records = [records]
        batch = list(records)
        seen: set[int] = set()
        for record in batch:
            if not isinstance(record, CertificationRecord):
                raise TypeError(f"write() accepts CertificationRecord objects; got {type(record).__name__}")
            if record.index in self.done or record.index in seen:
                raise ValueError(f"index {record.index} is already in {self.path}; each index may be written once")
            seen.add(record.index)
        if not batch:
            return 0
        data = "".join(record.to_json() + "\n" for record in batch).encode("utf-8")
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.update(seen)
        return len(batch)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"open, {len(self.done)} records"
        return f"RecordWriter({str(self.path)!r}, {state})"
