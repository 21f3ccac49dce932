r"""Attacking the certified records of one method: PGD on the certified network, or on a smoothed classifier's
surrogate followed by its Monte-Carlo check (Notes [certified classifier] and [grid records] in
:mod:`stablenet.workflows.verification`, which runs these over a record file).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from stablenet.certify.attack import pgd_l2
from stablenet.certify.records import ABSTAIN, CertificationRecord
from stablenet.certify.smoothed_attack import ExpectedScores, onto_grid

__all__ = [
    "DEFAULT_SMOOTHING_ALPHA",
    "DEFAULT_SMOOTHING_N",
    "DEFAULT_SMOOTHING_N0",
    "RADIUS_FACTOR",
    "attack_deterministic",
    "attack_smoothed",
    "certified_classifiers",
]

logger = logging.getLogger("stablenet.workflows.verification")

RADIUS_FACTOR: float = 0.99
"""The attack radius, as a fraction of the certified radius (strictly inside the certified ball)."""

DEFAULT_SMOOTHING_N: int = 1000
"""Monte-Carlo samples of the smoothed classifier's ``predict`` when the sidecar has no ``n``."""

DEFAULT_SMOOTHING_ALPHA: float = 0.001
"""Level of the smoothed classifier's ``predict`` when the sidecar has no ``alpha``."""

DEFAULT_SMOOTHING_N0: int = 100
"""Selection draws of the certifier (re-selecting LVM-RS's map) when the sidecar has no ``n0``."""


def _batches(todo: list, batch_size: int, bar: tqdm):
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        yield chunk
        bar.update(len(chunk))


def _detail(r: CertificationRecord, attack_radius: float, adv: int, distance: float, broken: bool) -> dict:
    return {
        "index": r.index,
        "label": r.label,
        "prediction": r.prediction,
        "radius": r.radius,
        "attack_radius": attack_radius,
        "adversarial_prediction": adv,
        "distance": distance,
        "broken": broken,
    }


def attack_deterministic(
    model: nn.Module,
    images: Tensor,
    todo: list[CertificationRecord],
    restarts: int,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    progress: bool,
) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="verify (pgd)", disable=not progress)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), images.dtype)
    for chunk in _batches(todo, batch_size, bar):
        x = images[[r.index for r in chunk]].to(device=device, dtype=dtype)
        target = torch.tensor([r.prediction for r in chunk], device=device)
        eps = torch.tensor([RADIUS_FACTOR * r.radius for r in chunk], dtype=torch.float64)
        x_adv, flipped = pgd_l2(model, x, target, eps.to(device), steps=steps, restarts=restarts, generator=generator)
        with torch.no_grad():
            clean = model(x).argmax(dim=1)
            adv = model(x_adv).argmax(dim=1)
        distance = (x_adv - x).flatten(1).norm(dim=1)
        # pgd_l2 flags a flip at any point it visited; the returned point is the highest-margin one.
        broken = flipped | (adv != target)
        for r, e, c, a, d, b in zip(
            chunk, eps.tolist(), clean.tolist(), adv.tolist(), distance.tolist(), broken.tolist(), strict=True
        ):
            details.append({**_detail(r, e, a, d, b), "clean_prediction": c})
    bar.close()
    return details


_Classifier = tuple[str, float | None, str]
"""``(simplex_map, inverse_temperature, map_source)`` of one record (Note [certified classifier])."""


def certified_classifiers(
    method: str,
    model: nn.Module,
    images: Tensor,
    todo: list[CertificationRecord],
    *,
    sigma: float,
    num_classes: int,
    certify_n0: int,
    certify_n: int,
    alpha: float,
    noise_batch_size: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    noise: dict[str, Any],
) -> list[_Classifier]:
    """The smoothed classifier each record's certificate is about (Note [certified classifier]); ``noise`` holds
    the certifiers' ``noise`` and ``levels`` options."""
    from stablenet.smoothing.simplex import SIMPLEX_MAPS
    from stablenet.smoothing.soft import HARD_VOTES

    allowed = {"smoothing": (HARD_VOTES,), "lvm-rs": tuple(SIMPLEX_MAPS), "cpm": ("softmax", HARD_VOTES)}[method]
    out: list[_Classifier | None] = []
    for r in todo:
        if r.simplex_map is None:
            out.append((HARD_VOTES, None, "method") if method == "smoothing" else None)
        elif r.simplex_map not in allowed:
            raise ValueError(
                f"record {r.index}: {method} certifies simplex_map {' or '.join(map(repr, allowed))}; "
                f"got {r.simplex_map!r}"
            )
        elif r.simplex_map != HARD_VOTES and r.inverse_temperature is None:
            raise ValueError(f"record {r.index}: simplex_map {r.simplex_map!r} needs an inverse_temperature; got None")
        else:
            s = None if r.simplex_map == HARD_VOTES else r.inverse_temperature
            out.append((r.simplex_map, s, "record"))
    missing = [i for i, c in enumerate(out) if c is None]
    if missing and method == "cpm":
        from stablenet.smoothing.cpm import CPMSmooth

        cpm = CPMSmooth(model, num_classes, sigma, input_shape=tuple(images.shape[1:]), input_range=None, **noise)
        soft = cpm.soft_votes  # a finite Lipschitz bound on the logits: soft votes (cpm's Note [what L means])
        choice = ("softmax" if soft else HARD_VOTES, cpm.inverse_temperature if soft else None, "re-derived")
        logger.info(
            "%d cpm records name no simplex_map; re-derived from the model as certify_run does: %s at s = %s",
            len(missing),
            choice[0],
            choice[1],
        )
        for i in missing:
            out[i] = choice
    elif missing:  # lvm-rs
        from stablenet.smoothing.lvm import LVMSmooth

        logger.warning(
            "%d lvm-rs records name no simplex_map/inverse_temperature (written before they were recorded); "
            "re-selecting each on %d fresh draws with the certifier's rule, which may differ from its choice",
            len(missing),
            certify_n0,
        )
        lvm = LVMSmooth(model, num_classes, sigma, input_range=None, **noise)
        for start in range(0, len(missing), batch_size):
            rows = missing[start : start + batch_size]
            x = images[[todo[i].index for i in rows]].to(device)
            map_index, temperature = lvm.select(x, certify_n0, certify_n, alpha, noise_batch_size, generator)
            for i, m, t in zip(rows, map_index.tolist(), temperature.tolist(), strict=True):
                out[i] = (lvm.maps[m], t, "re-selected")
    return [c for c in out if c is not None]  # every None was filled above


def attack_smoothed(
    model: nn.Module,
    images: Tensor,
    todo: list[CertificationRecord],
    *,
    method: str,
    sigma: float,
    num_classes: int | None,
    restarts: int,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    n: int,
    alpha: float,
    eot_samples: int,
    noise_batch_size: int,
    certify_n0: int,
    certify_n: int,
    noise: str,
    levels: int | None,
    device: torch.device,
    progress: bool,
) -> list[dict[str, Any]]:
    if n < 1 or eot_samples < 1 or noise_batch_size < 1:
        raise ValueError(
            f"smoothing_n, eot_samples and noise_batch_size must be >= 1; got {n}, {eot_samples}, {noise_batch_size}"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    if not todo:
        return []
    from stablenet.smoothing.cohen import Smooth
    from stablenet.smoothing.grid_noise import GridNoise
    from stablenet.smoothing.sampling import make_generator
    from stablenet.smoothing.soft import HARD_VOTES, soft_predict

    options: dict[str, Any] = {"noise": noise, "levels": levels} if noise == "grid" else {}
    grid = GridNoise(sigma, levels) if noise == "grid" else None

    if num_classes is None:
        with torch.no_grad():
            num_classes = int(model(images[:1].to(device)).shape[1])
    # Noise is drawn on the model's device (see Note [noise generator] in stablenet.smoothing.sampling),
    # seeded from the CPU generator so that one seed fixes the whole check.
    seed = int(torch.randint(2**62, (1,), generator=generator))
    noise_gen = make_generator(seed, device)
    classifiers = certified_classifiers(
        method,
        model,
        images,
        todo,
        sigma=sigma,
        num_classes=num_classes,
        certify_n0=certify_n0,
        certify_n=certify_n,
        alpha=alpha,
        noise_batch_size=noise_batch_size,
        batch_size=batch_size,
        generator=noise_gen,
        device=device,
        noise=options,
    )
    # The certificate covers the whole l2 ball, not only its part inside the pixel box: no range check.
    cohen = Smooth(model, num_classes, sigma, input_range=None, **options)
    groups: dict[tuple[str, float | None], list[int]] = {}
    for i, (simplex_map, s, _) in enumerate(classifiers):
        groups.setdefault((simplex_map, s), []).append(i)
    details: list[dict[str, Any]] = [{} for _ in todo]
    bar = tqdm(total=len(todo), desc="verify (pgd, smoothed)", disable=not progress)
    for (simplex_map, s), members in groups.items():
        hard = simplex_map == HARD_VOTES
        # Hard votes have no gradient at all; the softmax at s = 1 is the usual smooth stand-in (SmoothAdv).
        # Float noise even for grid records: the surrogate only proposes points (Note [grid records]).
        surrogate = ExpectedScores(
            model, sigma, eot_samples, noise_gen, "softmax" if hard else simplex_map, 1.0 if hard else float(s)
        )
        for rows in _batches(members, batch_size, bar):
            chunk = [todo[i] for i in rows]
            x = images[[r.index for r in chunk]].to(device)
            target = torch.tensor([r.prediction for r in chunk], device=device)
            eps = torch.tensor([RADIUS_FACTOR * r.radius for r in chunk], dtype=torch.float64)
            x_adv, _ = pgd_l2(surrogate, x, target, eps.to(device), steps=steps, restarts=restarts, generator=generator)
            rounding: list[str | None] = [None] * len(chunk)
            if grid is not None:  # Note [grid records]: the grid classifier is evaluated at grid points
                x_adv, rounding = onto_grid(x, x_adv, grid.to_grid(x), grid.levels, eps)
            if hard:
                adv = cohen.predict(x_adv, n, alpha, noise_batch_size, generator=noise_gen)
            else:
                adv = soft_predict(
                    model,
                    x_adv,
                    sigma,
                    n,
                    alpha,
                    noise_batch_size,
                    simplex_map=simplex_map,
                    inverse_temperature=float(s),
                    generator=noise_gen,
                    **options,
                )
            adv = torch.as_tensor(adv).to(device)
            broken = (adv != ABSTAIN) & (adv != target)
            distance = (x_adv - x).flatten(1).norm(dim=1)
            values = zip(
                rows, chunk, eps.tolist(), adv.tolist(), distance.tolist(), broken.tolist(), rounding, strict=True
            )
            for i, r, e, a, d, b, how in values:
                details[i] = {
                    **_detail(r, e, a, d, b),
                    "simplex_map": simplex_map,
                    "inverse_temperature": s,
                    "map_source": classifiers[i][2],
                    "noise": noise,
                    **({"levels": levels, "grid_rounding": how} if grid is not None else {}),
                }
    bar.close()
    return details
