r"""Lipschitz-variance-margin randomized smoothing (LVM-RS; Delattre et al., ICLR 2024, arXiv 2309.16883): the
certifier.

:class:`LVMSmooth` samples a simplex map (:mod:`stablenet.smoothing.simplex`) of the base model's logits under
Gaussian noise, chooses the map and the temperature per input, and certifies with the bounds and the radius of
:mod:`stablenet.smoothing.lvm_radii`, where the smoothed classifier, the two radii and the bounds' Notes live
(the public names of both are re-exported here).

# Note [grid noise]
With ``noise="grid"`` (:class:`~stablenet.smoothing.grid_noise.GridNoise`, Note [floating-point noise] in
:mod:`stablenet.smoothing.sampling`) the inputs lie on the grid :math:`\{k/L\}` and the model sees only
:math:`\phi(k + V)`, :math:`\phi(m) = m/L` in floating point, :math:`V` the Gaussian rounded to the grid. What
is certified is the smoothed map of the grid base model :math:`F(y) = f(\phi(\mathrm{round}(L y)))` under the
*real* Gaussian,

.. math:: g^F_c(x) = \mathbb E_\delta\, u_c(x + \delta), \qquad u_c(y) = h_s\big(F(y)\big)_c \in [0, 1],

and at a grid point :math:`x = k/L`, :math:`\mathrm{round}(L(x + \delta)) = k + \mathrm{round}(L\delta)`, so
:math:`g^F_c(x) = \mathbb E\, h_s(f(\phi(k + V)))_c` is the mean the sampler estimates, except that it draws
:math:`V` from a law within total variation :math:`\eta` = ``grid.tv_bound(d)`` of the rounded Gaussian. The
certificate survives in three steps:

1. *Bounds.* The empirical-Bernstein bounds hold, at their levels, for the means under the drawn law (its
   draws are i.i.d.). For :math:`u` with values in :math:`[0, 1]`,
   :math:`|\mathbb E_P u - \mathbb E_Q u| = |\int_0^1 (P - Q)(u > \tau)\,d\tau| \le \mathrm{TV}(P, Q) \le \eta`,
   so on the same event :math:`\underline p_A - \eta \le g^F_A(x)` and :math:`\overline p_B + \eta \ge
   \max_{B \ne A} g^F_B(x)` (the maximum of upper bounds each raised by :math:`\eta` is the raised maximum).
   The shift is deterministic: no share of :math:`\alpha` is spent. ``GridNoise.lower_bound`` and
   ``upper_bound`` apply it, rounding outwards and clipping to :math:`[0, 1]`.
2. *Radii.* Both forms above need only a measurable :math:`u` with values in :math:`[0, 1]` (:math:`R_\Phi`:
   Salman et al.'s :math:`1/\sigma`-Lipschitz :math:`\Phi^{-1} \circ \mathbb E\,u(\cdot + \delta)`;
   :math:`R_L`: the directional derivative of :math:`\mathbb E\,(u_A - u_B)(\cdot + \delta)` with
   :math:`u_A - u_B \in [-1, 1]`), not continuity. :math:`u_c` is measurable (:math:`F` is constant on each
   grid cell), so :math:`R_\Phi` and :math:`R_L` of the widened bounds are radii for
   :math:`\arg\max_c g^F_c` on the whole ball, grid points or not.
3. *Selection* (Note [selection and estimation]) may follow any rule of the selection draws; it stays
   unwidened (:math:`\eta < 10^{-12}` for a CIFAR-10 input would not change a choice).

# Note [selection and estimation]
The published code chose the map and temperature on the same samples that fed the confidence bound, which
voids the bound's level. Here the candidate (map, temperature) and the top class :math:`A` are chosen on
``n0`` *selection* draws only, as the candidate whose *predicted* radius is largest (the bounds of :func:`lvm_bounds`
evaluated with the selection means and variances but the estimation count ``n``); the bounds are then computed
from ``n`` *fresh* draws, which are independent of the choice (:mod:`stablenet.smoothing.sampling`, Note
[noise generator]). Conditionally on the choice, the bounds hold at their nominal levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from stablenet.abstain import ABSTAIN
from stablenet.smoothing.arguments import eval_mode
from stablenet.smoothing.grid_noise import GridNoise
from stablenet.smoothing.lvm_radii import lvm_bounds, lvm_radius, margin_radius
from stablenet.smoothing.sampling import NOISE_KINDS, make_generator, mean_and_variance
from stablenet.smoothing.simplex import SIMPLEX_MAPS, sparsemax

__all__ = [
    "SIMPLEX_MAPS",
    "LVMCertificate",
    "LVMSmooth",
    "lvm_bounds",
    "lvm_radius",
    "margin_radius",
    "sparsemax",
]


class LVMCertificate(NamedTuple):
    """Per-image result of :meth:`LVMSmooth.certify_detailed` (tensors of length ``N`` on the input's device)."""

    prediction: Tensor
    """Certified class, or ``ABSTAIN``."""
    radius: Tensor
    """Certified l2 radius (float64), 0 on abstention."""
    map_index: Tensor
    """Index into ``maps`` of the map chosen on the selection draws."""
    temperature: Tensor
    """Inverse temperature chosen on the selection draws (float64)."""
    p_lower: Tensor
    """Lower bound on :math:`g_A(x)` (float64)."""
    p_upper: Tensor
    """Upper bound on :math:`\\max_{B \\ne A} g_B(x)` (float64)."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class LVMSmooth:
    r"""LVM-RS certifier for ``base_model`` (logits of shape ``(B, num_classes)``) under noise
    :math:`\mathcal N(0, \sigma^2 I)`.

    Args:
        base_model: the classifier; put in eval mode while certifying (Note [eval mode]) and restored after.
        num_classes: number of logits ``K >= 2``.
        sigma: noise level.
        maps: simplex maps, names from :data:`SIMPLEX_MAPS` or callables ``(..., K) -> (..., K)`` with values in
            [0, 1] (values are clamped to [0, 1], which keeps the bounds valid for whatever map results).
        temperatures: the *inverse* temperatures :math:`s > 0`; the map is applied to :math:`s f(x)`.
        input_range: ``(low, high)`` that inputs must lie in (the noisy copies are not clipped), or ``None``.
        noise: ``"float"`` (``torch.randn`` in at least float32, sound only if the base model ignores rounding)
            or ``"grid"`` (the exact rounded Gaussian of :class:`~stablenet.smoothing.grid_noise.GridNoise`, for
            inputs on the grid ``k / levels``: sound for any base model, with the bounds widened by its
            ``tv_bound``); see the module's Note [grid noise].
        levels: grid steps per input unit for ``noise="grid"`` (255 for 8-bit images); unused otherwise.

    # Note [eval mode]
    The bounds assume i.i.d. draws; a BatchNorm in training mode would couple the noisy copies that share a
    batch, so the model is switched to eval mode for the duration of a call.

    Example:
        >>> model = nn.Linear(2, 2)
        >>> pred, radius = LVMSmooth(model, 2, sigma=0.5).certify(torch.rand(3, 2), 32, 256, 0.001, 512, 0)
        >>> bool((radius >= 0).all())
        True
    """

    def __init__(
        self,
        base_model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        maps: Sequence[str | Callable[[Tensor], Tensor]] = ("softmax", "sparsemax"),
        temperatures: Sequence[float] = (0.5, 1, 2, 4, 8, 16),
        input_range: tuple[float, float] | None = (0.0, 1.0),
        noise: str = "float",
        levels: int = 255,
    ) -> None:
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
            raise ValueError(f"sigma must be a finite number > 0; got {sigma!r}")
        if isinstance(maps, str):
            maps = (maps,)
        if len(maps) == 0:
            raise ValueError(f"maps must name at least one of {', '.join(repr(m) for m in SIMPLEX_MAPS)}")
        self._map_fns: list[Callable[[Tensor], Tensor]] = []
        for m in maps:
            if callable(m):
                self._map_fns.append(m)
            elif m in SIMPLEX_MAPS:
                self._map_fns.append(SIMPLEX_MAPS[m])
            else:
                raise ValueError(
                    f"map must be a callable or one of {', '.join(repr(k) for k in SIMPLEX_MAPS)}; got {m!r}"
                )
        temps = [float(t) for t in temperatures]
        if len(temps) == 0 or not all(0 < t < math.inf for t in temps):
            raise ValueError(f"temperatures must be finite numbers > 0 (at least one); got {tuple(temperatures)!r}")
        if input_range is not None:
            low, high = (float(v) for v in input_range)
            if not low < high:
                raise ValueError(f"input_range must be (low, high) with low < high, or None; got {input_range!r}")
            input_range = (low, high)
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(repr(k) for k in NOISE_KINDS)}; got {noise!r}")
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.maps = tuple(maps)
        self.temperatures = tuple(temps)
        self.input_range = input_range
        self.noise = noise
        self.grid = GridNoise(self.sigma, levels) if noise == "grid" else None

    @property
    def num_candidates(self) -> int:
        """Number of (map, temperature) pairs searched on the selection draws."""
        return len(self._map_fns) * len(self.temperatures)

    def simplex_values(self, logits: Tensor) -> Tensor:
        """``(B, maps * temperatures, K)`` float64 values in [0, 1] of every candidate map at every temperature."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the base model must return logits of shape (B, {self.num_classes}); got {tuple(logits.shape)}"
            )
        s = torch.tensor(self.temperatures, dtype=torch.float64, device=logits.device)
        scaled = logits.to(torch.float64)[:, None, :] * s[None, :, None]
        values = torch.stack([fn(scaled) for fn in self._map_fns], dim=1)
        return values.clamp(0.0, 1.0).reshape(len(logits), -1, self.num_classes)

    def _flat_values(self, logits: Tensor) -> Tensor:
        # Flattened to (B, C * K): CPU ``index_add_`` is much slower on small trailing 2-D slices.
        return self.simplex_values(logits).reshape(len(logits), -1)

    def _check(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError("x must be a tensor of shape (N, ...) holding a batch of inputs")
        if not _is_int(n0) or n0 < 1:
            raise ValueError(f"n0 must be an int >= 1; got {n0!r}")
        if not _is_int(n) or n < 2:
            raise ValueError(f"n must be an int >= 2 (the empirical-Bernstein bound needs 2 samples); got {n!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
        if torch.isnan(x).any():
            raise ValueError("x contains NaN")
        if self.input_range is not None and x.numel() > 0:
            low, high = self.input_range
            if x.min() < low or x.max() > high:
                raise ValueError(f"x must lie in input_range [{low}, {high}]; got values in [{x.min()}, {x.max()}]")

    def certify(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | int | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Certified predictions and l2 radii for a batch ``x`` of shape ``(N, ...)``.

        Guarantee: for each image, with probability at least :math:`1 - \alpha` over the noise, either the
        prediction is ``ABSTAIN`` (radius 0), or :math:`\arg\max_c g_c(x') = ` prediction for every
        :math:`\|x' - x\|_2 <` radius, where :math:`g` is the smoothed map with the (map, temperature) chosen
        on this image's selection draws (see :meth:`certify_detailed`).

        Returns:
            ``(prediction, radius)``: a long tensor and a float64 tensor of shape ``(N,)`` on ``x``'s device.
        """
        result = self.certify_detailed(x, n0, n, alpha, batch_size, generator)
        return result.prediction, result.radius

    def certify_detailed(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | int | None = None,
    ) -> LVMCertificate:
        r"""Like :meth:`certify`, also returning the chosen map, temperature and the two bounds.

        1. Selection (``n0`` draws per image): sample means and variances of every candidate map; per
           candidate, :math:`A` = the top class and the radius that :func:`lvm_bounds` would give with these
           statistics and ``n`` draws; keep the candidate with the largest predicted radius (or, when all are
           0, the largest predicted :math:`\underline p_A - \overline p_B`).
        2. Estimation (``n`` fresh draws): :func:`lvm_bounds` for the chosen candidate and class, then
           :func:`lvm_radius`; abstain when :math:`\underline p_A \le \overline p_B` or the model returned
           non-finite logits. With ``noise="grid"`` the two bounds are first widened by the grid noise's
           ``tv_bound`` for one input, and the guarantee is about the grid classifier (module Note [grid noise]).

        Caveat: the (map, temperature) may differ between inputs, so the certificate is about the smoothed
        classifier of the candidate chosen *for this input*; to certify one fixed classifier everywhere, pass a
        single map and a single temperature.
        """
        self._check(x, n0, n, alpha, batch_size)
        model = self.base_model
        param = next(iter(model.parameters()), None)
        if param is None:
            param = next(iter(model.buffers()), None)
        device = x.device if param is None else param.device
        dtype = param.dtype if param is not None and param.is_floating_point() else x.dtype
        x_dev = x.to(device=device, dtype=dtype)
        n_img = len(x)
        if n_img == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=x.device)
            index = torch.zeros(0, dtype=torch.long, device=x.device)
            return LVMCertificate(index, empty, index, empty, empty, empty)
        gen = make_generator(generator, device)

        with eval_mode(model):  # Note [eval mode] in stablenet.smoothing.arguments
            # Note [selection and estimation]: the estimation call continues the generator, so its draws are fresh.
            sel_mean, sel_var = mean_and_variance(
                model, x_dev, n0, self.sigma, batch_size, gen, self._flat_values, grid=self.grid
            )
            est_mean, est_var = mean_and_variance(
                model, x_dev, n, self.sigma, batch_size, gen, self._flat_values, grid=self.grid
            )

        shape = (n_img, self.num_candidates, self.num_classes)
        sel_mean, sel_var = sel_mean.cpu().numpy().reshape(shape), sel_var.cpu().numpy().reshape(shape)
        choice, top = self._select(sel_mean, sel_var, n, alpha)
        rows = np.arange(n_img)
        mean = est_mean.cpu().numpy().reshape(shape)[rows, choice]
        var = est_var.cpu().numpy().reshape(shape)[rows, choice]
        finite = np.isfinite(mean).all(axis=-1) & np.isfinite(var).all(axis=-1)
        mean, var = np.where(finite[:, None], mean, 0.5), np.where(finite[:, None], var, 0.25)
        p_lower, p_upper = lvm_bounds(mean, var, n, alpha, top)
        if self.grid is not None:  # Note [grid noise]: bounds for the drawn law, made ones for the rounded Gaussian
            dim = math.prod(x.shape[1:])
            p_lower, p_upper = self.grid.lower_bound(p_lower, dim), self.grid.upper_bound(p_upper, dim)
        certified = finite & (p_lower > p_upper)
        radius = np.where(certified, lvm_radius(p_lower, p_upper, self.sigma), 0.0)
        prediction = np.where(certified, top, ABSTAIN)

        def out(a: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=x.device, dtype=dtype)

        temps = np.asarray(self.temperatures, dtype=np.float64)
        return LVMCertificate(
            prediction=out(prediction, torch.long),
            radius=out(radius, torch.float64),
            map_index=out(choice // len(temps), torch.long),
            temperature=out(temps[choice % len(temps)], torch.float64),
            p_lower=out(np.where(finite, p_lower, 0.0), torch.float64),
            p_upper=out(np.where(finite, p_upper, 1.0), torch.float64),
        )

    def select(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | int | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""The (map, temperature) that :meth:`certify_detailed` would choose per image from ``n0`` selection draws.

        Step 1 of :meth:`certify_detailed` alone (``n`` and ``alpha`` only enter the predicted radius). The draws
        are whatever ``generator`` gives: with fresh draws the choice can differ from the one a certification
        made, which is why certification runs record it (``simplex_map`` and ``inverse_temperature`` in
        :class:`~stablenet.certify.records.CertificationRecord`);
        :func:`stablenet.workflows.verification.verify_records` falls back on this for records written before that.

        Returns:
            ``(map_index, temperature)``: a long tensor (indices into ``maps``) and a float64 tensor of inverse
            temperatures, both of shape ``(N,)`` on ``x``'s device.
        """
        self._check(x, n0, n, alpha, batch_size)
        model = self.base_model
        param = next(iter(model.parameters()), None)
        if param is None:
            param = next(iter(model.buffers()), None)
        device = x.device if param is None else param.device
        dtype = param.dtype if param is not None and param.is_floating_point() else x.dtype
        temps = np.asarray(self.temperatures, dtype=np.float64)
        if len(x) == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=x.device)
            return empty.long(), empty
        gen = make_generator(generator, device)
        with eval_mode(model):
            mean, var = mean_and_variance(
                model,
                x.to(device=device, dtype=dtype),
                n0,
                self.sigma,
                batch_size,
                gen,
                self._flat_values,
                grid=self.grid,
            )
        shape = (len(x), self.num_candidates, self.num_classes)
        choice, _ = self._select(mean.cpu().numpy().reshape(shape), var.cpu().numpy().reshape(shape), n, alpha)
        map_index = torch.as_tensor(choice // len(temps), dtype=torch.long).to(x.device)
        return map_index, torch.as_tensor(temps[choice % len(temps)], dtype=torch.float64).to(x.device)

    def _select(self, mean: np.ndarray, var: np.ndarray, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Candidate index and top class per image, from the selection statistics ``(N, C, K)`` only."""
        finite = np.isfinite(mean).all(axis=-1) & np.isfinite(var).all(axis=-1)
        mean = np.where(finite[..., None], mean, 0.5)
        var = np.where(finite[..., None], var, 0.25)
        top = mean.argmax(axis=-1)
        p_lower, p_upper = lvm_bounds(mean, var, n, alpha, top)
        radius = lvm_radius(p_lower, p_upper, self.sigma)
        # Where no candidate is predicted to certify, prefer the one closest to certifying (a negative score).
        score = np.where(p_lower > p_upper, radius, self.sigma * math.sqrt(math.pi / 2) * (p_lower - p_upper))
        score = np.where(finite, score, -np.inf)
        choice = score.argmax(axis=-1)
        return choice, np.take_along_axis(top, choice[:, None], axis=-1)[:, 0]
