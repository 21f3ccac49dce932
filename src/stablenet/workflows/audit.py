r"""``stablenet audit``: a trained model's stability from every side, on the same examples, in one report.

The pillars feed each other: the Lipschitz bound gives the margin certificate (and CPM's soft votes), smoothing
is certified by Cohen et al., LVM-RS and CPM on the same examples, ``verify`` attacks every kind of
certificate, a PGD attack on the model bounds what its own certificate could show, and the loss's curvature sits
beside it all.
:func:`audit` writes ``audit.json`` (the numbers, schema ``stablenet-audit/1``), ``audit.md`` and a
self-contained ``audit.html`` (:mod:`stablenet.workflows.audit_report`).

# Note [audit stages]
Each stage writes its result to ``OUT/stages/NAME.json`` (atomically) when it completes, and the certificates
go to ``OUT/records/KEY.jsonl`` as they are made (:func:`~stablenet.workflows.certification.certify_dataset`
resumes inside a file), the landscape's grid to ``OUT/stages/landscape.npz``. A rerun reads what is there and
computes the rest, so a killed audit resumes. ``OUT/stages/settings.json`` holds the subject and settings of
the audit in the folder; a rerun with others is a one-line error, never a mixed report.

What is measured (see :mod:`stablenet.workflows.audit_stages`): the first ``max_examples`` test images;
``clean`` accuracy; ``lipschitz`` upper (per layer) and lower bounds, or the modules that cannot be bounded
(listed, and the Lipschitz certificate is then not made: never a skipped module); ``certify:KEY`` for the
Lipschitz margin and, at each σ, Cohen's ``smoothing``, ``lvm-rs`` and ``cpm``; ``verify:KEY`` (deterministic
certificates: any change of prediction is a counter-example; randomized ones: an empirical check);
``attack`` (PGD at the data set's standard radii); ``hessian`` and ``landscape``. A curvature stage that fails
(a model whose second derivatives torch cannot take) is reported with its error, not hidden.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stablenet.atomic import atomic_write_json
from stablenet.bench.provenance import provenance
from stablenet.certify.records import read_records
from stablenet.data.radii import HEADLINE_RADIUS, STANDARD_RADII
from stablenet.workflows.audit_document import AUDIT_FORMAT
from stablenet.workflows.audit_report import write_audit_report
from stablenet.workflows.audit_stages import (
    attack_stage,
    certificate_summary,
    clean_stage,
    disagreements,
    hessian_stage,
    landscape_stage,
    lipschitz_stage,
)
from stablenet.workflows.audit_subject import AuditSubject, subject_from_factory, subject_from_run
from stablenet.workflows.certification import certify_dataset
from stablenet.workflows.certifiers import SmoothingParams
from stablenet.workflows.verification import verify_records

__all__ = ["AUDIT_FORMAT", "DEFAULT_SIGMA", "AuditSettings", "audit", "audit_factory", "audit_run"]

logger = logging.getLogger(__name__)


#: The noise level audited when none is given and the run was not trained with noise: a common σ of the
#: smoothing literature for each data set (Cohen et al. 2019, Table 1; MNIST as in Salman et al. 2019).
DEFAULT_SIGMA: dict[str, float] = {
    "digits": 0.25,
    "mnist": 0.5,
    "fashion-mnist": 0.5,
    "cifar10": 0.25,
    "cifar100": 0.25,
}
SMOOTHING_LABELS = {"smoothing": "Cohen", "lvm-rs": "LVM-RS", "cpm": "CPM"}


@dataclass(frozen=True)
class AuditSettings:
    """How much of each measurement an audit makes (:meth:`quick` for a first look in a minute or two).

    Attributes:
        max_examples: the first test images audited, by every stage.
        sigmas: noise levels of the smoothing certificates; ``None``: the run's training σ, else
            :data:`DEFAULT_SIGMA` of the data set.
        n0, n, alpha: Monte-Carlo selection and estimation draws, and the failure probability of each
            smoothing certificate (Cohen et al.'s 100, 100 000 and 0.001 are the published protocol).
        noise_batch_size: noisy samples per forward pass.
        attack_steps, attack_restarts: PGD at the standard radii.
        verify_examples, verify_steps, verify_restarts: certified records attacked per method, and the attack.
        hessian_examples, hessian_top_k, hessian_max_iter, trace_samples: the curvature stage.
        landscape_examples, landscape_resolution, landscape_span: the 2-D loss slice.
        seed: seeds every random draw of the audit.
        quick: recorded in the report.
    """

    max_examples: int = 500
    sigmas: tuple[float, ...] | None = None
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    noise_batch_size: int = 1000
    attack_steps: int = 50
    attack_restarts: int = 3
    verify_examples: int = 100
    verify_steps: int = 30
    verify_restarts: int = 2
    hessian_examples: int = 1000
    hessian_top_k: int = 3
    hessian_max_iter: int = 100
    trace_samples: int = 30
    landscape_examples: int = 1000
    landscape_resolution: int = 21
    landscape_span: float = 1.0
    seed: int = 0
    quick: bool = False

    @classmethod
    def for_quick(cls, **overrides: Any) -> AuditSettings:
        """Small settings: about a minute for a small MNIST network on a 2-core CPU."""
        small = dict(
            max_examples=50,
            n0=64,
            n=400,
            noise_batch_size=500,
            attack_steps=20,
            attack_restarts=1,
            verify_examples=10,
            verify_steps=10,
            verify_restarts=1,
            hessian_examples=128,
            hessian_top_k=1,
            hessian_max_iter=15,
            trace_samples=6,
            landscape_examples=128,
            landscape_resolution=7,
            quick=True,
        )
        return cls(**{**small, **overrides})

    def __post_init__(self) -> None:
        counts = ("max_examples", "n0", "n", "noise_batch_size", "attack_steps", "attack_restarts")
        counts += ("verify_steps", "verify_restarts", "hessian_examples", "hessian_top_k", "hessian_max_iter")
        counts += ("landscape_examples",)
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.verify_examples < 0:
            raise ValueError(f"verify_examples must be >= 0; got {self.verify_examples}")
        if self.trace_samples < 2:
            raise ValueError(f"trace_samples must be >= 2 (for a standard error); got {self.trace_samples}")
        if self.landscape_resolution < 2:
            raise ValueError(f"landscape_resolution must be >= 2; got {self.landscape_resolution}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1); got {self.alpha}")
        if not self.landscape_span > 0:
            raise ValueError(f"landscape_span must be > 0; got {self.landscape_span}")
        for sigma in self.sigmas or ():
            if not (isinstance(sigma, (int, float)) and sigma > 0):
                raise ValueError(f"sigma must be > 0; got {sigma!r}")


class _Stages:
    """Runs each stage once: cached results are read back (Note [audit stages]), times are recorded."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        self.folder = out / "stages"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.times: dict[str, dict[str, Any]] = {}

    def run(self, name: str, compute: Callable[[], Any]) -> Any:
        path = self.folder / f"{name.replace(':', '_').replace('@', '_')}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            self.times[name] = {"time_s": saved["time_s"], "cached": True}
            self.say(f"{name}: cached ({saved['time_s']:.1f} s when computed)")
            return saved["result"]
        self.say(f"{name} ...")
        t0 = time.perf_counter()
        result = compute()
        elapsed = time.perf_counter() - t0
        atomic_write_json(path, {"time_s": elapsed, "result": result})
        self.times[name] = {"time_s": elapsed, "cached": False}
        self.say(f"{name}: done in {elapsed:.1f} s")
        return result


def _check_folder(out: Path, identity: dict[str, Any]) -> None:
    path = out / "stages" / "settings.json"
    if path.exists():
        saved, now = _flat(json.loads(path.read_text())), _flat(identity)
        differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if differ:
            raise ValueError(
                f"{out} holds an audit with other settings ({', '.join(differ)} differ); use another --out or delete it"
            )
    else:
        atomic_write_json(path, identity)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: the settings named one by one in an error."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sigmas(settings: AuditSettings, subject: AuditSubject, training_sigma: float | None) -> tuple[float, ...]:
    if settings.sigmas:
        return tuple(float(s) for s in settings.sigmas)
    if training_sigma:
        return (float(training_sigma),)
    return (DEFAULT_SIGMA.get(subject.dataset, 0.25),)


def _method_keys(sigmas: tuple[float, ...], lipschitz_ok: bool) -> list[tuple[str, str, float | None]]:
    keys = [("lipschitz", "lipschitz", None)] if lipschitz_ok else []
    return keys + [(f"{m}@{s:g}", m, s) for s in sigmas for m in SMOOTHING_LABELS]


def _label(method: str, sigma: float | None) -> str:
    return "Lipschitz margin" if method == "lipschitz" else f"{SMOOTHING_LABELS[method]} σ={sigma:g}"


def audit(
    subject: AuditSubject,
    out: str | os.PathLike,
    settings: AuditSettings | None = None,
    *,
    training_sigma: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit ``subject`` into ``out`` (``audit.json``, ``audit.md``, ``audit.html``); returns the audit dict.

    Args:
        subject: the model and its test data (:func:`audit_run`, :func:`audit_factory` build one).
        out: the output folder; a killed audit resumes from it (Note [audit stages]).
        settings: default :class:`AuditSettings`.
        training_sigma: the σ the model was trained with, the default noise level.
        progress: a line per stage and progress bars.
    """
    settings = settings or AuditSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda line: print(f"audit: {line}", flush=True)) if progress else (lambda line: logger.info(line))
    model, dataset = subject.model.eval(), subject.dataset
    sigmas = _sigmas(settings, subject, training_sigma)
    settings = dataclasses.replace(settings, sigmas=sigmas)
    n = min(settings.max_examples, len(subject.images))
    indices = list(range(n))
    images, labels = subject.images[:n], subject.labels[:n]
    headline = HEADLINE_RADIUS.get(dataset, STANDARD_RADII.get(dataset, (0.5,))[0])
    radii = sorted({*STANDARD_RADII.get(dataset, (headline,)), headline})
    identity = {"subject": subject.description, "dataset": dataset, "settings": dataclasses.asdict(settings)}
    _check_folder(out, json.loads(json.dumps(identity)))
    stages = _Stages(out, say)
    t_start = time.perf_counter()

    clean = stages.run("clean", lambda: clean_stage(model, images, labels))
    inputs = images[: min(64 if not settings.quick else 16, n)]
    lip = stages.run(
        "lipschitz",
        lambda: lipschitz_stage(model, subject.input_shape, inputs, seed=settings.seed, quick=settings.quick),
    )
    methods: dict[str, dict[str, Any]] = {}
    verify: dict[str, dict[str, Any]] = {}
    for key, method, sigma in _method_keys(sigmas, lip["upper"] is not None):
        records_path = out / "records" / f"{key}.jsonl"
        params = None
        if sigma is not None:
            params = SmoothingParams(
                sigma=sigma, n0=settings.n0, n=settings.n, alpha=settings.alpha, seed=settings.seed
            )

        def certify(method: str = method, params: SmoothingParams | None = params, path: Path = records_path) -> dict:
            certify_dataset(
                model,
                subject.images,
                subject.labels,
                path,
                method=method,
                smoothing=params,
                batch_size=settings.noise_batch_size if params is not None else 256,
                indices=indices,
                metadata={"dataset": dataset, "split": "test", **({"sigma": params.sigma} if params else {})},
                progress=progress,
            )
            return {"file": str(path.relative_to(out))}

        stage = stages.run(f"certify:{key}", certify)
        records = read_records(out / stage["file"])
        methods[key] = {
            "label": _label(method, sigma),
            "method": method,
            "sigma": sigma,
            "file": stage["file"],
            **certificate_summary(records, indices, radii),
            "time_s": stages.times[f"certify:{key}"]["time_s"],
        }
        if settings.verify_examples > 0:
            verify[key] = stages.run(
                f"verify:{key}",
                lambda records=records, method=method, sigma=sigma: _verify(
                    model, subject, records, method, sigma, settings
                ),
            )
    attack = stages.run(
        "attack",
        lambda: attack_stage(
            model,
            images,
            labels,
            clean["predictions"],
            radii,
            steps=settings.attack_steps,
            restarts=settings.attack_restarts,
            seed=settings.seed,
        ),
    )
    curvature = _curvature(stages, model, subject, settings, out, progress)
    audit_dict = _assemble(
        subject, settings, radii, headline, indices, clean, lip, methods, verify, attack, curvature, stages
    )
    audit_dict["stages"]["total"] = {"time_s": time.perf_counter() - t_start, "cached": False}
    atomic_write_json(out / "audit.json", audit_dict)
    thumbnails = {d["index"]: subject.images[d["index"]].numpy() for d in audit_dict["certificates"]["disagreements"]}
    write_audit_report(audit_dict, out, thumbnails)
    say(f"wrote {out / 'audit.html'}, {out / 'audit.md'} and {out / 'audit.json'}")
    return audit_dict


def _verify(model, subject: AuditSubject, records, method: str, sigma: float | None, settings: AuditSettings):
    options: dict[str, Any] = {}
    if sigma is not None:
        options = dict(
            sigma=sigma,
            num_classes=subject.num_classes,
            smoothing_n=settings.n,
            alpha=settings.alpha,
            certify_n0=settings.n0,
            certify_n=settings.n,
            noise_batch_size=settings.noise_batch_size,
        )
    result = verify_records(
        model,
        subject.images,
        records,
        method=method,
        restarts=settings.verify_restarts,
        steps=settings.verify_steps,
        max_examples=settings.verify_examples,
        generator=torch.Generator().manual_seed(settings.seed),
        **options,
    )
    keys = ("empirical", "n_certified", "n_attacked", "n_broken", "broken_indices")
    return {k: getattr(result, k) for k in keys}


def _curvature(stages: _Stages, model, subject: AuditSubject, settings: AuditSettings, out: Path, progress: bool):
    record: dict[str, Any] = {"top_eigenvalues": None, "trace": None, "landscape": None, "error": None}
    k = min(settings.hessian_examples, len(subject.images))
    record["num_examples"] = k
    try:
        hessian = stages.run(
            "hessian",
            lambda: hessian_stage(
                model,
                subject.images[:k],
                subject.labels[:k],
                top_k=settings.hessian_top_k,
                trace_samples=settings.trace_samples,
                max_iter=settings.hessian_max_iter,
                seed=settings.seed,
            ),
        )
        record.update(top_eigenvalues=hessian["top_eigenvalues"], trace=hessian["trace"])
        m = min(settings.landscape_examples, len(subject.images))
        record["landscape"] = stages.run(
            "landscape",
            lambda: landscape_stage(
                model,
                subject.images[:m],
                subject.labels[:m],
                resolution=settings.landscape_resolution,
                span=settings.landscape_span,
                checkpoint=out / "stages" / "landscape.npz",
                seed=settings.seed,
                progress=progress,
            ),
        )
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # reported, never hidden
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return record


def _assemble(subject, settings, radii, headline, indices, clean, lip, methods, verify, attack, curvature, stages):
    at = radii.index(headline)
    best = max(methods, key=lambda key: methods[key]["certified_accuracy"][at], default=None)
    best_acc = methods[best]["certified_accuracy"][at] if best else None
    robust = attack["robust_accuracy"][at]
    warnings = _warnings(lip, methods, verify, attack, radii, curvature)
    upper, lower = lip["upper"], lip["lower"]
    return {
        "format": AUDIT_FORMAT,
        "subject": {
            **subject.description,
            "dataset": subject.dataset,
            "input_shape": list(subject.input_shape),
            "num_classes": subject.num_classes,
            "num_parameters": sum(p.numel() for p in subject.model.parameters()),
        },
        "settings": {
            "quick": settings.quick,
            "seed": settings.seed,
            "max_examples": settings.max_examples,
            "num_examples": len(indices),
            "headline_radius": headline,
            "radii": radii,
            "sigmas": list(settings.sigmas),
            "smoothing": {
                "n0": settings.n0,
                "n": settings.n,
                "alpha": settings.alpha,
                "batch_size": settings.noise_batch_size,
            },
            "attack": {"steps": settings.attack_steps, "restarts": settings.attack_restarts},
            "verify": {
                "max_examples": settings.verify_examples,
                "steps": settings.verify_steps,
                "restarts": settings.verify_restarts,
            },
            "hessian": {
                "top_k": settings.hessian_top_k,
                "num_examples": curvature["num_examples"],
                "trace_samples": settings.trace_samples,
                "max_iter": settings.hessian_max_iter,
            },
            "landscape": {
                "resolution": settings.landscape_resolution,
                "span": settings.landscape_span,
                "num_examples": min(settings.landscape_examples, len(subject.images)),
            },
        },
        "environment": provenance(device=next((p.device for p in subject.model.parameters()), "cpu")),
        "stages": dict(stages.times),
        "summary": {
            "clean_accuracy": clean["accuracy"],
            "headline_radius": headline,
            "best_method": best,
            "best_certified_accuracy": best_acc,
            "empirical_robust_accuracy": robust,
            # The attack is on the model: it bounds the model's own (Lipschitz) certificate, not the smoothed
            # classifier's, which may be more robust than the model.
            "gap": robust - methods["lipschitz"]["certified_accuracy"][at] if "lipschitz" in methods else None,
            "lipschitz_upper": upper,
            "lipschitz_lower": lower,
            "tightness": lower / upper if upper else None,
            "warnings": warnings,
        },
        "lipschitz": lip,
        "certificates": {
            "indices": indices,
            "labels": subject.labels[: len(indices)].tolist(),
            "methods": methods,
            "disagreements": disagreements(methods, indices, subject.labels[: len(indices)].tolist()),
        },
        "soundness": {"verify": verify, "attack": attack},
        "curvature": {k: v for k, v in curvature.items()},
    }


def _warnings(lip, methods, verify, attack, radii, curvature) -> list[str]:
    warnings = []
    for key, result in verify.items():
        if result["n_broken"]:
            label = methods[key]["label"]
            if result["empirical"]:
                warnings.append(
                    f"{label}: the attack changed the smoothed prediction of {result['n_broken']} of "
                    f"{result['n_attacked']} certified examples inside their radius (evidence against these "
                    "certificates, each of which may fail with probability alpha)"
                )
            else:
                warnings.append(
                    f"{label}: CERTIFICATE BROKEN: the attack changed the prediction of {result['n_broken']} of "
                    f"{result['n_attacked']} certified examples inside their radius"
                )
    if lip["unbounded"]:
        names = ", ".join(f"{m['name']} ({m['type']})" for m in lip["unbounded"][:6])
        more = f" and {len(lip['unbounded']) - 6} more" if len(lip["unbounded"]) > 6 else ""
        warnings.append(
            f"no Lipschitz bound, so no Lipschitz certificate: {len(lip['unbounded'])} module(s) cannot be bounded: "
            f"{names}{more}"
        )
    if lip["upper"] is not None and lip["lower"] > lip["upper"]:
        warnings.append("the empirical lower bound on the Lipschitz constant exceeds the certified upper bound")
    for m in methods.values():
        over = [r for r, c, a in zip(radii, m["certified_accuracy"], attack["robust_accuracy"], strict=True) if c > a]
        if over and m["method"] == "lipschitz":
            warnings.append(
                f"{m['label']}: certified accuracy above the attack's robust accuracy at r = "
                f"{', '.join(f'{r:g}' for r in over)}"
            )
    for m in methods.values():
        if not any(r > 0 and c for r, c in zip(m["radii"], m["correct"], strict=True)):
            count = len(m["radii"])
            warnings.append(f"{m['label']} certified none of the {count} examples (it abstained or was wrong)")
    if curvature["error"]:
        warnings.append(f"curvature not measured: {curvature['error']}")
    return warnings


def audit_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    settings: AuditSettings | None = None,
    *,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`audit` of a stablenet run directory (its training σ, if any, is the default noise level)."""
    subject = subject_from_run(run_dir, data_root, device)
    config = Path(run_dir) / "config.yaml"
    sigma = None
    if config.exists():
        import yaml

        sigma = (yaml.safe_load(config.read_text()) or {}).get("noise_sigma") or None
    return audit(subject, out, settings, training_sigma=sigma, progress=progress)


def audit_factory(
    spec: str,
    dataset: str,
    out: str | os.PathLike,
    settings: AuditSettings | None = None,
    *,
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`audit` of a plain classifier built by ``spec`` (``module:function``) on ``dataset``'s test split."""
    return audit(subject_from_factory(spec, dataset, data_root, device), out, settings, progress=progress)
