"""Synthetic audit dicts in the ``stablenet-audit/1`` format, for the report's tests (no model is run).

Per-example radii are drawn with a fixed seed; every aggregate (ACR, certified accuracy, summary, disagreements)
is computed from them the way the audit defines it, so the fixture is internally consistent.
"""

from __future__ import annotations

import copy

import numpy as np

RADII = [0.25, 0.5, 1.0, 1.5]
N = 20


def _method(key, label, method, sigma, radii, correct, time_s):
    radii = np.asarray(radii, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    counted = np.where(correct, radii, 0.0)
    return {
        "label": label,
        "method": method,
        "sigma": sigma,
        "file": f"{key.replace('@', '_')}.jsonl",
        "radii": [float(r) for r in radii],
        "correct": [bool(c) for c in correct],
        "acr": float(counted.mean()),
        "certified_accuracy": [float(np.mean(correct & (radii >= r))) for r in RADII],
        "time_s": time_s,
    }


def _disagreements(methods, indices, labels, count=2):
    keys = list(methods)
    counted = np.array([np.where(methods[k]["correct"], methods[k]["radii"], 0.0) for k in keys])
    spread = counted.max(axis=0) - counted.min(axis=0)
    return [
        {
            "index": indices[i],
            "label": labels[i],
            "radii": {k: methods[k]["radii"][i] for k in keys},
            "correct": {k: methods[k]["correct"][i] for k in keys},
        }
        for i in np.argsort(-spread, kind="stable")[:count]
    ]


def sample_audit() -> dict:
    """A full audit of a digits model: Lipschitz plus three smoothing methods at σ=0.25 over 20 examples."""
    rng = np.random.default_rng(0)
    indices = [int(i) for i in rng.choice(360, size=N, replace=False)]
    labels = [int(y) for y in rng.integers(0, 10, size=N)]
    methods = {}
    for key, label, method, scale in [
        ("lipschitz", "Lipschitz margin", "lipschitz", 0.6),
        ("smoothing@0.25", "Cohen σ=0.25", "smoothing", 0.5),
        ("lvm-rs@0.25", "LVM-RS σ=0.25", "lvm-rs", 0.55),
        ("cpm@0.25", "CPM σ=0.25", "cpm", 0.45),
    ]:
        correct = rng.random(N) < 0.9
        radii = rng.exponential(scale, size=N)
        methods[key] = _method(key, label, method, None if method == "lipschitz" else 0.25, radii, correct, 1.5)
    robust = [0.8, 0.65, 0.4, 0.2]
    best = max(methods, key=lambda k: methods[k]["certified_accuracy"][0])
    best_ca = methods[best]["certified_accuracy"][0]
    layers = [{"name": f"features.{i}", "bound": float(b)} for i, b in enumerate([1.0, 1.02, 0.98, 1.0, 1.01])]
    upper = float(np.prod([x["bound"] for x in layers]))
    lower = 0.37
    verify = {
        k: {
            "empirical": m["method"] != "lipschitz",
            "n_certified": 17,
            "n_attacked": 17,
            "n_broken": 0,
            "broken_indices": [],
        }
        for k, m in methods.items()
    }
    verify["cpm@0.25"].update(n_broken=1, broken_indices=[indices[3]])
    grid = np.linspace(-1.0, 1.0, 5)
    loss = [[float(0.1 + a**2 + 0.5 * b**2) for b in grid] for a in grid]
    return {
        "format": "stablenet-audit/1",
        "subject": {
            "kind": "run",
            "run": "runs/digits-demo",
            "factory": None,
            "model": "lipconvnet",
            "dataset": "digits",
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            "num_parameters": 12345,
        },
        "settings": {
            "quick": True,
            "seed": 0,
            "max_examples": N,
            "num_examples": N,
            "headline_radius": RADII[0],
            "radii": list(RADII),
            "sigmas": [0.25],
            "smoothing": {"n0": 64, "n": 1000, "alpha": 0.001, "batch_size": 200},
            "attack": {"steps": 50, "restarts": 2},
            "verify": {"max_examples": 20, "steps": 50, "restarts": 1},
            "hessian": {"top_k": 3, "num_examples": 64, "trace_samples": 20, "max_iter": 50},
            "landscape": {"resolution": 5, "span": 1.0, "num_examples": 64},
        },
        "environment": {
            "device": "cpu",
            "torch": "2.4.0",
            "python": "3.11.2",
            "commit": "abc1234",
            "date": "2024-06-01T12:00:00",
            "command": "stablenet audit --run runs/digits-demo --quick --out runs/audit",
        },
        "stages": {
            "load": {"time_s": 0.12, "cached": False},
            "clean": {"time_s": 0.05, "cached": False},
            "lipschitz": {"time_s": 0.4, "cached": True},
            **{f"certify:{k}": {"time_s": m["time_s"], "cached": False} for k, m in methods.items()},
            **{f"verify:{k}": {"time_s": 0.8, "cached": False} for k in methods},
            "attack": {"time_s": 2.1, "cached": False},
            "hessian": {"time_s": 3.3, "cached": False},
            "landscape": {"time_s": 1.7, "cached": False},
        },
        "summary": {
            "clean_accuracy": float(np.mean(methods["lipschitz"]["correct"])),
            "headline_radius": RADII[0],
            "best_method": best,
            "best_certified_accuracy": best_ca,
            "empirical_robust_accuracy": robust[0],
            "gap": robust[0] - best_ca,
            "lipschitz_upper": upper,
            "lipschitz_lower": lower,
            "tightness": lower / upper,
            "warnings": [f"1 certificate of CPM σ=0.25 broken by the attack (index {indices[3]})"],
        },
        "lipschitz": {
            "upper": upper,
            "lower": lower,
            "ratio": upper / lower,
            "layers": layers,
            "unbounded": [{"name": "head.dropout", "type": "Dropout", "reason": "random in training mode"}],
            "inputs": "the 20 audited test examples",
        },
        "certificates": {
            "indices": indices,
            "labels": labels,
            "methods": methods,
            "disagreements": _disagreements(methods, indices, labels),
        },
        "soundness": {
            "verify": verify,
            "attack": {"radii": list(RADII), "robust_accuracy": robust, "steps": 50, "restarts": 2},
        },
        "curvature": {
            "top_eigenvalues": [12.5, 7.25, 3.125],
            "trace": {"estimate": 41.7, "standard_error": 2.3, "num_samples": 20},
            "num_examples": 64,
            "landscape": {"alphas": grid.tolist(), "betas": grid.tolist(), "loss": loss, "accuracy": loss},
            "error": None,
        },
    }


def null_audit() -> dict:
    """The sample with what can be missing missing: an unbounded network (so no certificate), no attack, and
    curvature that failed."""
    audit = copy.deepcopy(sample_audit())
    audit["certificates"].update(methods={}, disagreements=[])
    audit["soundness"] = {"verify": {}, "attack": None}
    audit["stages"] = {k: v for k, v in audit["stages"].items() if ":" not in k and k != "attack"}
    audit["lipschitz"].update(upper=None, ratio=None, layers=[])
    audit["lipschitz"]["unbounded"].append({"name": "pool", "type": "MaxPool2d", "reason": "no bound implemented"})
    audit["summary"].update(
        best_method=None,
        best_certified_accuracy=None,
        gap=None,
        empirical_robust_accuracy=None,
        lipschitz_upper=None,
        tightness=None,
        warnings=["2 modules cannot be bounded (head.dropout, pool): no certificate was computed"],
    )
    audit["curvature"] = {
        "top_eigenvalues": None,
        "trace": None,
        "num_examples": 0,
        "landscape": None,
        "error": "the loss is not twice differentiable (MaxPool2d)",
    }
    audit["environment"]["commit"] = None
    return audit
