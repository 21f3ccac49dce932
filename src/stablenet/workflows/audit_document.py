"""The content of a stability audit's report, as a list of blocks made from the audit dict alone.

A block is a small tuple (a heading, a paragraph, summary cards, warnings, a table, a figure by name) holding
plain, unescaped text with every number already formatted; :mod:`stablenet.workflows.audit_report` renders the
one list twice, as Markdown and as HTML, so the two reports cannot drift apart.

Formats: accuracies in percent with 1 decimal, measured radii with 3 significant digits, Lipschitz bounds with
4, the standard radii as the certification report writes them (``0.5``, ``36/255``); a missing value (null in
the audit) is "–", with the reason where the audit gives one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from stablenet.workflows.audit_figures import short_label
from stablenet.workflows.report import format_radius, format_time

__all__ = ["AUDIT_FORMAT", "DASH", "Block", "audit_blocks"]


AUDIT_FORMAT = "stablenet-audit/1"
"""The ``format`` field of the audit dicts this module renders."""

DASH = "–"
"""Shown for a missing value."""

# A block is a tuple whose first item names its kind:
#   ("h1" | "h2" | "h3", text), ("p" | "subtitle" | "missing", text), ("cards", [(label, value, detail), ...]),
#   ("warnings", [text, ...]), ("table", header, rows), ("figure", name, caption, reason if absent)
Block = tuple


def _pct(x: float | None) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def _sig(x: float | None, digits: int) -> str:
    return DASH if x is None else f"{x:.{digits}g}"


def _value(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[list[str]]:
    rows = []
    for key, v in d.items():
        if isinstance(v, Mapping):
            rows += _flatten(v, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _value(v)])
    return rows


def _summary(audit: Mapping[str, Any]) -> list[Block]:
    s, methods = audit["summary"], audit["certificates"]["methods"]
    n, dataset = audit["settings"]["num_examples"], audit["subject"]["dataset"]
    eps = format_radius(s["headline_radius"])
    best = methods[s["best_method"]]["label"] if s.get("best_method") in methods else None
    unbounded = len(audit["lipschitz"].get("unbounded") or [])
    cards = [
        ("Clean accuracy", _pct(s["clean_accuracy"]), f"on {n} test examples"),
        (f"Certified at ε = {eps}", _pct(s.get("best_certified_accuracy")), f"by {best}" if best else "no certificate"),
        (
            "Gap to the attack",
            DASH if s.get("gap") is None else f"{100 * s['gap']:.1f} pts",
            f"Lipschitz margin vs the attack's {_pct(s['empirical_robust_accuracy'])} robust"
            if s.get("gap") is not None
            else "no certificate of the model itself",
        ),
        (
            "Lipschitz tightness",
            _sig(s.get("tightness"), 3),
            f"lower {_sig(s.get('lipschitz_lower'), 4)} / upper {_sig(s.get('lipschitz_upper'), 4)}"
            if s.get("lipschitz_upper") is not None
            else f"no upper bound: {unbounded} module(s) cannot be bounded",
        ),
    ]
    text = f"On {n} test examples of {dataset}, the model is right on {_pct(s['clean_accuracy'])}."
    if best:
        text += (
            f" The best certificate, {best}, proves {_pct(s['best_certified_accuracy'])} of them right and unchanged"
            f" within radius ε = {eps}."
        )
    if s.get("empirical_robust_accuracy") is not None:
        text += (
            f" An attack on the model at that radius leaves {_pct(s['empirical_robust_accuracy'])} robust: no"
            " certificate of the model itself can prove more (smoothing certifies the smoothed classifier, which"
            " the attack does not bound)."
        )
    return [("h2", "Summary"), ("p", text), ("cards", cards), ("warnings", list(s.get("warnings") or []))]


def _lipschitz(audit: Mapping[str, Any]) -> list[Block]:
    lip = audit["lipschitz"]
    upper = _sig(lip.get("upper"), 4) if lip.get("upper") is not None else f"{DASH} (some modules cannot be bounded)"
    blocks: list[Block] = [
        ("h2", "Lipschitz"),
        (
            "p",
            f"Upper bound on the network's l2 Lipschitz constant (product of the layers' bounds): {upper}. "
            f"Empirical lower bound (measured at {lip.get('inputs') or DASH}): {_sig(lip.get('lower'), 4)}. "
            f"Ratio upper / lower: {_sig(lip.get('ratio'), 4)} (1 means the bound is tight).",
        ),
    ]
    if lip.get("layers"):
        rows = [[x["name"], x.get("type", DASH), _sig(x["bound"], 4)] for x in lip["layers"]]
        blocks.append(("table", ["layer", "type", "upper bound"], rows))
    blocks.append(("figure", "lipschitz", "Lipschitz bound per layer", "no per-layer bounds"))
    if lip.get("unbounded"):
        rows = [[m["name"], m["type"], m["reason"]] for m in lip["unbounded"]]
        blocks += [("h3", "Modules without a bound"), ("table", ["module", "type", "reason"], rows)]
    return blocks


def _certificates(audit: Mapping[str, Any]) -> list[Block]:
    cert, radii = audit["certificates"], audit["settings"]["radii"]
    methods = cert["methods"]
    blocks: list[Block] = [("h2", "Certificates on the same examples")]
    if not methods:
        return [*blocks, ("missing", "No certificate was computed.")]
    blocks.append(
        (
            "p",
            f"Every method certifies the same {len(cert['indices'])} examples. ε = r: the fraction classified "
            "correctly and certified at radius ≥ r. ACR: average certified radius (0 for a wrong prediction).",
        )
    )
    header = ["method", "σ", "clean acc", *(f"ε = {format_radius(r)}" for r in radii), "ACR", "time"]
    rows = [
        [
            m["label"],
            _sig(m.get("sigma"), 3),
            _pct(float(np.mean(m["correct"])) if m["correct"] else None),
            *(_pct(a) for a in m["certified_accuracy"]),
            _sig(m["acr"], 3),
            format_time(m["time_s"]),
        ]
        for m in methods.values()
    ]
    blocks += [
        ("table", header, rows),
        (
            "figure",
            "certified_accuracy",
            "Certified accuracy vs radius; the attack on the model bounds the Lipschitz curve",
            "no data",
        ),
        (
            "figure",
            "radius_scatter",
            "Lipschitz radius vs smoothing radius per example",
            "needs the Lipschitz and a smoothing method",
        ),
    ]
    several = len({m.get("sigma") for m in methods.values() if m.get("sigma") is not None}) > 1
    if cert.get("disagreements"):
        keys = list(methods)
        rows = [
            [str(d["index"]), str(d["label"])]
            + [
                DASH if k not in d["radii"] else f"{d['radii'][k]:.3g}" + ("" if d["correct"].get(k, True) else " ✗")
                for k in keys
            ]
            for d in cert["disagreements"]
        ]
        header = ["index", "label", *(short_label(k, methods[k], several) for k in keys)]
        blocks += [
            ("h3", "Where the methods disagree most"),
            ("p", "Radius per method; ✗ marks a wrong prediction (its radius certifies nothing)."),
            ("table", header, rows),
            ("figure", "thumbnails", "The examples where the methods disagree most", "no images given"),
        ]
    return blocks


def _soundness(audit: Mapping[str, Any]) -> list[Block]:
    sound, methods = audit.get("soundness") or {}, audit["certificates"]["methods"]
    blocks: list[Block] = [
        ("h2", "Soundness"),
        (
            "p",
            "An attack searches each certified ball for a changed prediction; a broken certificate is a "
            "counter-example (expected 0). For a randomized method the check is empirical: it holds with "
            "probability 1 − α, so a rare break is possible.",
        ),
    ]
    verify = sound.get("verify") or {}
    rows = [
        [
            methods[k]["label"] if k in methods else k,
            str(v["n_certified"]),
            str(v["n_attacked"]),
            str(v["n_broken"]),
            ", ".join(map(str, v.get("broken_indices") or [])) or DASH,
            "empirical" if v["empirical"] else "exact model",
        ]
        for k, v in verify.items()
    ]
    header = ["method", "certified", "attacked", "broken", "broken indices", "check"]
    blocks.append(("table", header, rows) if rows else ("missing", "No certificate was verified."))
    attack = sound.get("attack")
    if not attack:
        return [*blocks, ("missing", "No attack was run.")]
    lipschitz = methods.get("lipschitz")
    best = {r: lipschitz["certified_accuracy"][i] for i, r in enumerate(audit["settings"]["radii"]) if lipschitz}
    rows = [
        [format_radius(r), _pct(a), _pct(best.get(r))]
        for r, a in zip(attack["radii"], attack["robust_accuracy"], strict=True)
    ]
    blocks += [
        ("h3", "Empirical robust accuracy"),
        (
            "p",
            f"PGD ({attack['steps']} steps, {attack['restarts']} restarts) on the model, same examples: the "
            "accuracy it leaves is an upper bound on what a certificate of the model itself (the Lipschitz margin) "
            "can show. Smoothing certifies the smoothed classifier, a different one that the attack does not bound.",
        ),
        ("table", ["radius ε", "robust accuracy (attack)", "Lipschitz margin certified"], rows),
    ]
    return blocks


def _curvature(audit: Mapping[str, Any]) -> list[Block]:
    curv = audit.get("curvature") or {}
    blocks: list[Block] = [("h2", "Curvature")]
    if curv.get("error"):
        return [*blocks, ("missing", f"Curvature was not computed: {curv['error']}")]
    eig, trace = curv.get("top_eigenvalues"), curv.get("trace")
    text = f"Hessian of the loss over {curv.get('num_examples', DASH)} examples. Top eigenvalues: "
    text += ", ".join(_sig(e, 4) for e in eig) if eig else f"{DASH} (not computed)"
    text += ". Trace: " + (
        f"{_sig(trace['estimate'], 4)} ± {_sig(trace['standard_error'], 2)} "
        f"(Hutchinson, {trace['num_samples']} samples)."
        if trace
        else f"{DASH} (not computed)."
    )
    return [
        *blocks,
        ("p", text),
        ("figure", "landscape", "Loss on a random 2-D slice through the weights", "no landscape computed"),
    ]


def _settings(audit: Mapping[str, Any]) -> list[Block]:
    stages = audit.get("stages") or {}
    rows = [[name, format_time(v["time_s"]), "cached" if v["cached"] else "run"] for name, v in stages.items()]
    rows.append(["total", format_time(sum(v["time_s"] for v in stages.values())), ""])
    return [
        ("h2", "Settings and environment"),
        ("table", ["setting", "value"], _flatten(audit["settings"])),
        ("h3", "Environment"),
        ("table", ["field", "value"], _flatten(audit.get("environment") or {})),
        ("h3", "Wall time per stage"),
        ("table", ["stage", "wall time", "result"], rows),
    ]


def audit_blocks(audit: Mapping[str, Any]) -> list[Block]:
    """The report of ``audit`` as blocks: title, Summary, Lipschitz, Certificates, Soundness, Curvature, Settings.

    Raises:
        ValueError: If ``audit`` is not a dict whose ``format`` is :data:`AUDIT_FORMAT`.
    """
    if not isinstance(audit, Mapping) or audit.get("format") != AUDIT_FORMAT:
        got = audit.get("format") if isinstance(audit, Mapping) else type(audit).__name__
        raise ValueError(f"audit must be a dict with format {AUDIT_FORMAT!r}; got {got!r}")
    sub = audit["subject"]
    where = f"run {sub['run']}" if sub["kind"] == "run" else f"model factory {sub['factory']}"
    shape = "×".join(map(str, sub["input_shape"]))
    date = (audit.get("environment") or {}).get("date")
    line = f"{where}; input {shape}, {sub['num_classes']} classes, {sub['num_parameters']:,} parameters"
    return [
        ("h1", f"Stability audit: {sub['model']} on {sub['dataset']}"),
        ("subtitle", line + (f"; audited {date}." if date else ".")),
        *_summary(audit),
        *_lipschitz(audit),
        *_certificates(audit),
        *_soundness(audit),
        *_curvature(audit),
        *_settings(audit),
    ]
