r"""Attack certified predictions: an empirical check that certificates hold.

For every record with a certified radius :math:`R > 0`, search the l2 ball of radius :math:`0.99\,R` around
the input for a point where the prediction differs from the certified one. The ball is the whole of
:math:`\mathbb{R}^d`'s ball, not clipped to the pixel box, because that is what a certificate claims.

* **Deterministic certificates** (``lipschitz``): the model is attacked directly with
  :func:`stablenet.certify.attack.pgd_l2`. A certified prediction that changes inside its ball is a
  counter-example: the certificate (or the code that produced it) is wrong.
* **Randomized certificates** (``smoothing``, ``lvm-rs``, ``cpm``): *an empirical check only*, of the smoothed
  classifier that the record's method certifies (Note [certified classifier]). A smoothed classifier has no
  usable gradient, so PGD runs on a Monte-Carlo surrogate with fresh noise :math:`\delta_i` at every step
  (expectation over transformation, as in SmoothAdv, Salman et al. 2019), and the smoothed classifier's own
  Monte-Carlo ``predict`` is then evaluated at the point found. A different, non-abstaining class there is
  evidence against the certificate, not proof: both the certificate and ``predict`` hold only with
  probability :math:`1-\alpha`, so a correct certificate is "broken" with probability at most about ``alpha``
  per example.

An attack that finds nothing proves nothing.

Why our own PGD and not ``torchattacks``: :func:`~stablenet.certify.attack.pgd_l2` takes one radius per
example (each certificate has its own), uses the margin loss that decides the prediction, batches
examples with different radii, runs on any device, and adds no dependency.

# Note [certified classifier]
Each randomized method certifies its own smoothed classifier, so each record is checked against that one:

* ``smoothing`` (Cohen et al. 2019): hard votes, :math:`g(x) = \arg\max_c P(f(x+\delta) = c)`. Surrogate
  :math:`\log \frac1k\sum_{i=1}^k \operatorname{softmax} f(x + \delta_i)`; check: Cohen's
  :meth:`~stablenet.smoothing.cohen.Smooth.predict`.
* ``lvm-rs`` (:mod:`stablenet.smoothing.lvm`): the soft classifier :math:`G(x) = \arg\max_c
  \mathbb E[h(s\,f(x+\delta))_c]` with the simplex map :math:`h` and inverse temperature :math:`s` chosen for
  *this* example on the certifier's selection draws, read from the record's ``simplex_map`` and
  ``inverse_temperature``. Surrogate :math:`\log \frac1k\sum_{i=1}^k h(s\,f(x + \delta_i))` (same map, same
  temperature); check: :func:`~stablenet.smoothing.soft.soft_predict` (mean scores over ``n`` draws; abstains
  unless the top class's empirical-Bernstein lower bound beats every other class's upper bound).
* ``cpm`` (:mod:`stablenet.smoothing.cpm`): when the base model's logits have a finite Lipschitz bound, each
  noisy copy votes for a class drawn from :math:`\mathrm{softmax}(s\,f)`, so the certified classifier is the
  soft one above with :math:`h` = softmax at CPM's ``inverse_temperature``; otherwise Cohen's hard votes. The
  record says which; surrogate and check as for ``lvm-rs`` or ``smoothing``.

Records written before ``simplex_map`` and ``inverse_temperature`` existed: for ``cpm`` the choice depends only
on the model, so it is re-derived as :func:`~stablenet.workflows.certification.certify_run` makes it (a
:class:`~stablenet.smoothing.cpm.CPMSmooth` with its defaults: exact for the same checkpoint and code; logged).
For ``lvm-rs`` it depended on the certifier's selection draws, which cannot be replayed (their seeds depend on
how the run was chunked, resumed and sharded, and on the device), so
:meth:`~stablenet.smoothing.lvm.LVMSmooth.select` re-selects on fresh ``n0`` draws with the certifier's rule and
a one-line warning says so: the check is then about a classifier that may differ from the certified one
wherever two candidates were close. Each attacked record's details say which classifier was checked and where
it came from (``map_source``: ``record``, ``method``, ``re-derived`` or ``re-selected``).

# Note [grid records]
Records made with ``noise="grid"`` (the sidecar's ``noise`` and ``levels``, Note [grid runs] in
:mod:`stablenet.workflows.certification`) certify the smoothed classifier of the grid base model
:math:`f(\mathrm{round}(L\,\cdot)/L)`, and the final check evaluates that classifier: Cohen's ``predict`` or
:func:`~stablenet.smoothing.soft.soft_predict` with the same grid noise and ``levels``. Its exact sampler needs
its input on the grid, so the adversarial point is moved onto the grid first, inside the pixel box
:math:`[0, 1]` (the 8-bit images, for ``levels = 255``, that a grid certificate is meant for): to the nearest
grid point, clipped to the box, when that stays within the attack radius, else rounded toward the clean input
coordinate by coordinate (never further from it than the attack's point, so always within the radius). The
details record ``noise``, ``levels``, the rounding used (``grid_rounding``: ``nearest`` or ``toward input``)
and the distance after rounding. Below a radius of ``1 / levels`` the only grid point in the ball is the input
itself, so such records are checked at it alone (for ``digits``, ``levels = 16``: radii below 0.0625). The
attack's surrogate (the EOT gradient) keeps float noise: it only proposes
points, and an attack that finds nothing proves nothing, so its noise need not be the certified one.

Example:
    >>> result = verify_run("runs/digits", "runs/digits/lipschitz.jsonl")
    >>> result.n_broken  # must be 0 for a sound deterministic certifier
    0
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stablenet.certify.lipschitz import certified_network
from stablenet.certify.records import ABSTAIN, CertificationRecord, read_metadata, read_records
from stablenet.models.persistence import load_run, read_model_metadata
from stablenet.precision import sound_arithmetic
from stablenet.workflows.record_attacks import (
    DEFAULT_SMOOTHING_ALPHA,
    DEFAULT_SMOOTHING_N,
    DEFAULT_SMOOTHING_N0,
    RADIUS_FACTOR,
    attack_deterministic,
    attack_smoothed,
)

__all__ = [
    "ATTACKS",
    "DEFAULT_SMOOTHING_ALPHA",
    "DEFAULT_SMOOTHING_N",
    "DEFAULT_SMOOTHING_N0",
    "DETERMINISTIC_METHODS",
    "RADIUS_FACTOR",
    "RANDOMIZED_METHODS",
    "VerifyResult",
    "verify_records",
    "verify_run",
]

logger = logging.getLogger(__name__)

ATTACKS: tuple[str, ...] = ("pgd",)
"""Accepted attack names."""

DETERMINISTIC_METHODS: tuple[str, ...] = ("lipschitz",)
"""Methods whose certificates are proofs: one broken certificate is a bug."""

RANDOMIZED_METHODS: tuple[str, ...] = ("smoothing", "lvm-rs", "cpm")
"""Methods whose certificates hold with probability ``1 - alpha``: the check is empirical."""


@dataclass
class VerifyResult:
    """Outcome of attacking the certified records of one file.

    Attributes:
        method: certification method of the records.
        empirical: ``True`` for randomized certificates (see the module docstring).
        n_records: records considered.
        n_certified: records with a non-abstaining prediction and a radius > 0.
        n_attacked: certified records attacked (at most ``max_examples``).
        n_broken: attacked records whose prediction changed inside ``RADIUS_FACTOR`` times their radius.
        broken_indices: data-set indices of the broken records, sorted.
        details: one dict per attacked record, by index: ``index, label, prediction, radius, attack_radius,
            adversarial_prediction, distance, broken``, and ``clean_prediction`` for deterministic records or
            ``simplex_map, inverse_temperature, map_source`` (the smoothed classifier checked, Note [certified
            classifier]) and ``noise`` for randomized ones, with ``levels`` and ``grid_rounding`` for grid
            noise (Note [grid records]).
    """

    method: str
    empirical: bool
    n_records: int
    n_certified: int
    n_attacked: int
    n_broken: int
    broken_indices: list[int]
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no certified prediction changed."""
        return self.n_broken == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)


def _check_method(method: str) -> None:
    accepted = (*DETERMINISTIC_METHODS, *RANDOMIZED_METHODS)
    if method not in accepted:
        raise ValueError(f"method must be one of {', '.join(accepted)}; got {method!r}")


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def verify_records(
    model: nn.Module,
    images: Tensor,
    records: Sequence[CertificationRecord],
    *,
    method: str,
    restarts: int = 3,
    steps: int = 50,
    batch_size: int = 256,
    max_examples: int | None = None,
    generator: torch.Generator | None = None,
    sigma: float | None = None,
    num_classes: int | None = None,
    smoothing_n: int = DEFAULT_SMOOTHING_N,
    alpha: float = DEFAULT_SMOOTHING_ALPHA,
    eot_samples: int = 8,
    noise_batch_size: int = 1000,
    certify_n0: int = DEFAULT_SMOOTHING_N0,
    certify_n: int | None = None,
    arithmetic: str = "float64",
    noise: str = "float",
    levels: int | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Attack each certified record at ``RADIUS_FACTOR`` times its radius; count changed predictions.

    Args:
        model: the classifier the records were made with (pixels in [0, 1] to logits); for randomized
            methods, the base model of the smoothed classifier. Used as it is (call ``.eval()`` first).
        images: the data set the records index into, ``(N, C, H, W)``; ``record.index`` selects a row.
        records: the certificates (one method, l2 norm).
        method: their certification method, one of :data:`DETERMINISTIC_METHODS` or
            :data:`RANDOMIZED_METHODS`.
        restarts, steps: PGD restarts (the first from the input) and gradient steps per restart.
        batch_size: examples attacked together.
        max_examples: attack at most this many certified records (the first by index); default all.
        generator: CPU generator for random starts and noise seeds (default: a fresh seed).
        sigma: noise level of the smoothed classifier (required for randomized methods).
        num_classes: outputs of the base model (randomized methods; default: from one forward pass).
        smoothing_n, alpha: Monte-Carlo samples and level of the smoothed classifier's ``predict`` (``alpha`` is
            also the certifier's level when LVM-RS's map is re-selected).
        eot_samples: noise draws per PGD step in the expectation (randomized methods).
        noise_batch_size: noisy rows per forward pass in ``predict``.
        certify_n0, certify_n: the certifier's ``n0`` and ``n`` (default ``smoothing_n``), used only to re-select
            the map of ``lvm-rs`` records that do not name it (Note [certified classifier]).
        arithmetic: for Lipschitz records, the arithmetic they certify (``"float64"`` or ``"native"``, Note
            [certified arithmetic] in ``stablenet.certify.lipschitz``): the attack runs on that network.
        noise, levels: the noise the randomized records were certified with, ``"float"`` or ``"grid"`` with its
            grid steps per input unit (Note [grid records]); the images must then lie on that grid.
        progress: show a tqdm bar.

    Returns:
        A :class:`VerifyResult`.

    Raises:
        ValueError: unknown method, records of another method or norm, indices outside ``images``,
            missing ``sigma`` for a randomized method, a record naming a smoothed classifier its method does not
            certify, a bad count, or a bad ``noise``/``levels`` (or images off their grid).
    """
    _check_method(method)
    if restarts < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"restarts, steps and batch_size must be >= 1; got {restarts}, {steps}, {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1; got {max_examples}")
    if images.dim() < 2:
        raise ValueError(f"images must be (N, ...) with one row per example; got shape {tuple(images.shape)}")
    for r in records:
        if r.method != method or r.norm != "l2":
            raise ValueError(
                f"record {r.index} has method {r.method!r} and norm {r.norm!r}; expected method {method!r} "
                "and norm 'l2' (one file, one method)"
            )
        if r.index >= len(images):
            raise ValueError(f"record index {r.index} is outside the {len(images)} images it should index into")
    randomized = method in RANDOMIZED_METHODS
    if randomized and not (sigma is not None and sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"method {method!r} needs the smoothing noise level sigma > 0; got {sigma}")
    _check_noise(method, noise, levels)
    certified = sorted((r for r in records if r.prediction != ABSTAIN and r.radius > 0), key=lambda r: r.index)
    todo = certified if max_examples is None else certified[:max_examples]
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    device = _device_of(model)
    if randomized:
        details = attack_smoothed(
            model,
            images,
            todo,
            method=method,
            sigma=float(sigma),
            num_classes=num_classes,
            restarts=restarts,
            steps=steps,
            batch_size=batch_size,
            generator=generator,
            n=smoothing_n,
            alpha=alpha,
            eot_samples=eot_samples,
            noise_batch_size=noise_batch_size,
            certify_n0=certify_n0,
            certify_n=smoothing_n if certify_n is None else certify_n,
            noise=noise,
            levels=levels,
            device=device,
            progress=progress,
        )
    else:
        network = certified_network(model, arithmetic)
        with sound_arithmetic():
            details = attack_deterministic(
                network, images, todo, restarts, steps, batch_size, generator, device, progress
            )
    broken = sorted(d["index"] for d in details if d["broken"])
    if broken:
        logger.warning("%d of %d attacked %s certificates broken: %s", len(broken), len(todo), method, broken[:20])
    return VerifyResult(
        method=method,
        empirical=randomized,
        n_records=len(records),
        n_certified=len(certified),
        n_attacked=len(todo),
        n_broken=len(broken),
        broken_indices=broken,
        details=details,
    )


def _check_noise(method: str, noise: object, levels: object) -> None:
    from stablenet.smoothing.sampling import NOISE_KINDS

    if noise not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {', '.join(repr(k) for k in NOISE_KINDS)}; got {noise!r}")
    if noise == "grid" and method not in RANDOMIZED_METHODS:
        raise ValueError(
            f"noise 'grid' applies to the randomized methods {', '.join(RANDOMIZED_METHODS)}; got {method!r}"
        )
    if noise == "grid" and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 1):
        raise ValueError(f"noise 'grid' needs levels, an int >= 1 (the grid k / levels); got {levels!r}")


def _records_method(records: list[CertificationRecord], meta: dict[str, Any], path: Path) -> str:
    methods = sorted({r.method for r in records})
    if len(methods) > 1:
        raise ValueError(f"{path} mixes methods {', '.join(methods)}; verify one method per file")
    method = methods[0] if methods else meta.get("method")
    if method is None:
        raise ValueError(f"{path} has no records and its metadata names no method; nothing to verify")
    if "method" in meta and meta["method"] != method:
        raise ValueError(f"{path}: records say method {method!r} but the metadata says {meta['method']!r}")
    _check_method(method)
    return method


def verify_run(
    run_dir: str | os.PathLike,
    records_path: str | os.PathLike,
    *,
    attack: str = "pgd",
    restarts: int = 3,
    steps: int = 50,
    max_examples: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    data_root: str | os.PathLike | None = None,
    smoothing_n: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> VerifyResult:
    """Attack the certified records of ``records_path``, rebuilding the model from ``run_dir``.

    The data set and split come from the records' sidecar metadata (``FILE.meta.json``); for randomized
    methods so do ``sigma`` (required), ``n`` (default :data:`DEFAULT_SMOOTHING_N`) and ``alpha``
    (default :data:`DEFAULT_SMOOTHING_ALPHA`) of the smoothed classifier's ``predict``, and the certifier's
    ``n0`` and ``n`` (to re-select LVM-RS's map for old records), and ``noise`` (``"float"`` when absent: records
    made before it was recorded drew float noise) with its ``levels``. Randomized records get an empirical check
    only, of the classifier their method certifies, with the noise it was certified with (see the module
    docstring, Notes [certified classifier] and [grid records]).

    Args:
        run_dir: run directory holding ``model.safetensors``.
        records_path: JSON Lines record file written by a certifier.
        attack: attack name, one of :data:`ATTACKS`.
        restarts, steps: PGD restarts and steps per restart.
        max_examples: attack at most this many certified records (the first by index).
        device: where to run the attack.
        batch_size: examples attacked together.
        data_root: directory holding the data set files.
        smoothing_n: override the sidecar's ``n`` for ``predict``.
        seed: seeds the random starts and the noise.
        progress: show a tqdm bar.

    Raises:
        ValueError: unknown attack or method, missing metadata, or records that do not match the data set.
        FileNotFoundError: no checkpoint or record file.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
    records_path = Path(records_path)
    records = read_records(records_path)
    meta = read_metadata(records_path)
    method = _records_method(records, meta, records_path)
    if "dataset" not in meta:
        raise ValueError(f"{records_path}.meta.json does not name the data set; verify needs its 'dataset'")
    model_meta = read_model_metadata(run_dir)
    if model_meta.get("dataset", meta["dataset"]) != meta["dataset"]:
        raise ValueError(
            f"run {run_dir} was trained on {model_meta['dataset']!r} but the records are for {meta['dataset']!r}"
        )
    if "run" in meta and Path(meta["run"]).resolve() != Path(run_dir).resolve():
        logger.warning("%s was made from run %s, verifying with run %s", records_path, meta["run"], run_dir)
    device = torch.device(device)
    run = load_run(run_dir, meta.get("split", "test"), data_root, map_location=device)
    model, images, labels = run.model, run.images, run.labels
    for r in records:
        if r.index >= len(images) or int(labels[r.index]) != r.label:
            raise ValueError(
                f"{records_path}: record {r.index} (label {r.label}) does not match {meta['dataset']} "
                f"{meta.get('split', 'test')} ({len(images)} examples); were the records made on another data set?"
            )
    # Lipschitz records made before the float64 default certified the model's own float32 forward
    options: dict[str, Any] = {"arithmetic": meta.get("arithmetic", "native")}
    if method in RANDOMIZED_METHODS:
        if "sigma" not in meta:
            raise ValueError(f"{records_path}.meta.json has no 'sigma'; {method} records need their noise level")
        options = {
            **options,
            "sigma": float(meta["sigma"]),
            "num_classes": int(model_meta["num_classes"]),
            "smoothing_n": int(smoothing_n if smoothing_n is not None else meta.get("n", DEFAULT_SMOOTHING_N)),
            "alpha": float(meta.get("alpha", DEFAULT_SMOOTHING_ALPHA)),
            "certify_n0": int(meta.get("n0", DEFAULT_SMOOTHING_N0)),
            "certify_n": int(meta.get("n", DEFAULT_SMOOTHING_N)),
            "noise": meta.get("noise", "float"),
            "levels": meta.get("levels"),
        }
        if options["noise"] == "grid" and options["levels"] is None:
            raise ValueError(f"{records_path}.meta.json says noise 'grid' but has no 'levels'; verify needs its grid")
    return verify_records(
        model,
        images,
        records,
        method=method,
        restarts=restarts,
        steps=steps,
        batch_size=batch_size,
        max_examples=max_examples,
        generator=torch.Generator().manual_seed(seed),
        progress=progress,
        **options,
    )
