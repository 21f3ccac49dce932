r"""CPM randomized smoothing: the certifier (Delattre, Caillon, Barthélemy, Fagnou & Allauzen, AISTATS 2025,
arXiv 2504.02412).

:class:`CPMSmooth` samples the base model under Gaussian noise (:mod:`stablenet.smoothing.sampling`) and turns the
vote counts into a certificate with the Lipschitz-aware radius and the class-partition bounds of
:mod:`stablenet.smoothing.cpm_radii`, where the theorem, its proof and the bounds' Notes live (its public names are
re-exported here).

# Note [what L means]
A hard vote :math:`\mathbb 1[\arg\max_k z_k(x) = c]` is not Lipschitz however small the logits' Lipschitz
constant is (any open set is the positive set of a 1-Lipschitz function), so no Lipschitz refinement is sound
for Cohen's hard-vote classifier: for a linear model the half-space *is* Cohen's worst case. :class:`CPMSmooth`
therefore smooths *soft votes* when the base model's logit map :math:`z` has a finite :math:`\ell_2` Lipschitz
constant :math:`L`: each noisy copy votes for a class drawn from :math:`\mathrm{softmax}(s\,z(x+\delta))`
(Gumbel-max sampling), so the vote counts are multinomial with probabilities
:math:`p_c(x) = \mathbb E\,\mathrm{softmax}(s\,z(x+\delta))_c` and Clopper–Pearson applies unchanged. A softmax
coordinate has gradient :math:`q_c(e_c - q)` of norm :math:`\le \sqrt2\,q_c(1-q_c) \le \sqrt2/4`, so the class
scores are :math:`\ell = s L \sqrt2/4`-Lipschitz
(:func:`~stablenet.smoothing.cpm_radii.softmax_score_lipschitz`). With :math:`L = \infty` (no bound) the classifier
is Cohen's hard-vote one and :math:`G_0 = \Phi`.

# Note [temperature selection]
The inverse temperature :math:`s` trades two things: a small :math:`s` gives soft votes with a small score
constant :math:`\ell = sL\sqrt2/4` (a large Lipschitz gain in the radius) but flat votes (a small
:math:`p_A`); a large one gives sharp votes and a large :math:`\ell`, and hard votes are the limit
:math:`s = \infty`, :math:`\ell = \infty` (Cohen's radius). No single :math:`s` suits every input: with
:math:`s = 1` on a 1-Lipschitz network, whose logits differ by a few units at most, the votes are almost uniform
and CPM abstains nearly everywhere. With ``temperatures`` set, :class:`CPMSmooth` therefore chooses, per input,
among the soft votes at each :math:`s` and the hard votes, the candidate whose radius
:func:`~stablenet.smoothing.cpm_radii.predicted_radius` predicts from the ``n0`` selection draws (every candidate
votes on the same noisy copies, each with its own Gumbel draws; the prediction uses the scores behind the votes,
Note [selection scores]); ties go to the hard votes. The bounds then come
from ``n`` fresh draws of the chosen candidate alone, which are independent of the choice, so they hold at their
nominal level conditionally on it (the same argument as LVM-RS's Note [selection and estimation]). The choice is
returned (``inverse_temperature``, ``inf`` for hard votes) and recorded by certification runs, so that ``verify``
attacks the classifier that was certified. Including the hard votes means the selection can always fall back on
Cohen's certificate (with CPM's class partition on top).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.stats
import torch
from torch import Tensor, nn

from stablenet.abstain import ABSTAIN
from stablenet.smoothing import sampling
from stablenet.smoothing.arguments import check_alpha as _check_alpha
from stablenet.smoothing.arguments import check_count as _check_count
from stablenet.smoothing.arguments import check_lipschitz as _check_lipschitz
from stablenet.smoothing.arguments import check_positive as _check_positive
from stablenet.smoothing.arguments import check_values, model_device
from stablenet.smoothing.arguments import eval_mode as _eval_mode
from stablenet.smoothing.cpm_radii import (
    CPMBounds,
    cpm_bounds,
    cpm_radius,
    lower_top,
    predicted_radius,
    softmax_score_lipschitz,
)
from stablenet.smoothing.grid_noise import GridNoise
from stablenet.spectral import lipschitz_upper_bound

__all__ = [
    "CPM_TEMPERATURES",
    "CPMBounds",
    "CPMCertificate",
    "CPMSmooth",
    "cpm_bounds",
    "cpm_radius",
    "lower_top",
    "predicted_radius",
    "softmax_score_lipschitz",
]

logger = logging.getLogger(__name__)

CPM_TEMPERATURES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
"""The inverse temperatures the ``cpm`` certifier chooses from per input, besides hard votes (Note
[temperature selection])."""


class CPMCertificate(NamedTuple):
    """Per-image result of :meth:`CPMSmooth.certify_detailed` (tensors of length ``N`` on the model's device)."""

    prediction: Tensor
    """Certified class, or ``ABSTAIN``."""
    radius: Tensor
    """Certified l2 radius (float64), 0 on abstention."""
    p_lower: Tensor
    """Lower bound on :math:`p_A(x)` (float64)."""
    p_upper: Tensor
    """Upper bound on :math:`\\max_{c \\ne A} p_c(x)` (float64)."""
    num_buckets: Tensor
    """Buckets used for the non-top classes (long)."""
    inverse_temperature: Tensor
    """Inverse temperature of the soft votes certified, ``inf`` for hard votes (float64; Note [temperature
    selection])."""


class _SoftmaxVote(nn.Module):
    """Votes for a class drawn from ``softmax(s * base(x))`` (Gumbel-max), returned as one-hot-argmax scores."""

    def __init__(self, base: nn.Module, inverse_temperature: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base, self.s, self.generator = base, inverse_temperature, generator

    def forward(self, x: Tensor) -> Tensor:
        logits = self.base(x).to(torch.float64) * self.s
        u = torch.rand(logits.shape, generator=self.generator, device=logits.device, dtype=torch.float64)
        # argmax(logits + Gumbel) ~ Categorical(softmax(logits)); u = 0 gives -inf, never NaN.
        return logits - torch.log(-torch.log(u))


class CPMSmooth:
    r"""Randomized smoothing with Lipschitz-aware radii and class partitioning (Delattre et al., AISTATS 2025).

    The smoothed classifier is :math:`g(x) = \arg\max_c p_c(x)`, :math:`p_c(x) = \mathbb E\,v_c(x + \delta)`,
    :math:`\delta \sim \mathcal N(0, \sigma^2 I)`, where the vote :math:`v(y)` is a class drawn from
    :math:`\mathrm{softmax}(s\,z(y))` when the logit map :math:`z` = ``base_model`` has a finite Lipschitz constant
    :math:`L` (class scores :math:`\ell = sL\sqrt2/4`-Lipschitz), and :math:`\arg\max_k z_k(y)` (Cohen's hard vote,
    :math:`\ell = \infty`) otherwise; see the module's Note [what L means].

    Args:
        base_model: maps ``(B, *input_shape)`` inputs to ``(B, num_classes)`` logits; run in eval mode.
        num_classes: number of classes, >= 2.
        sigma: noise level, > 0.
        lipschitz: :math:`\ell_2` Lipschitz constant :math:`L` of the logit map, > 0 (``inf``: hard votes, Cohen's
            radius). ``None``: :func:`~stablenet.spectral.lipschitz_upper_bound` of ``base_model`` (in eval mode),
            or ``inf`` if it raises ``TypeError`` (a module it cannot bound); which one is logged. Its
            ``ValueError`` (e.g. a convolution without ``input_shape``) propagates. It is computed once: build a
            new certifier when the weights change.
        input_shape: shape of one input, without the batch dimension (needed to bound convolutions).
        num_buckets: largest number of buckets for the non-top classes (:func:`cpm_bounds`), >= 1.
        input_range: inclusive ``(low, high)`` that inputs must lie in, or ``None``. Noisy copies are not clipped.
        inverse_temperature: :math:`s > 0` of the soft votes (not used with hard votes, nor with ``temperatures``).
        temperatures: candidate inverse temperatures (finite, > 0) to choose from per input, besides hard votes,
            on the selection draws (Note [temperature selection]); ``None``: the soft votes at
            ``inverse_temperature`` only. Not used with hard votes (:math:`L = \infty`, or grid noise). The
            ``cpm`` certifier of certification runs passes :data:`CPM_TEMPERATURES`.
        noise: ``"float"`` or ``"grid"``, as in :class:`~stablenet.smoothing.cohen.Smooth` (Note [floating-point
            noise] in :mod:`~stablenet.smoothing.sampling`). The grid classifier is piecewise constant, so
            ``"grid"`` needs hard votes: ``lipschitz`` must be ``None`` (then taken as ``inf``, no bound is
            computed) or ``inf``.
        levels: grid steps per input unit for ``noise="grid"``; unused otherwise.

    Example:
        >>> smooth = CPMSmooth(model, num_classes=10, sigma=0.25, input_shape=(3, 32, 32))
        >>> prediction, radius = smooth.certify(images, n0=100, n=10_000, alpha=0.001, batch_size=1000)
        >>> # for each i, with probability >= 0.999: prediction[i] == ABSTAIN (radius 0), or
        >>> # g(images[i] + e) == prediction[i] for every ||e||_2 < radius[i]
    """

    def __init__(
        self,
        base_model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        lipschitz: float | None = None,
        input_shape: Sequence[int] | None = None,
        num_buckets: int = 2,
        input_range: tuple[float, float] | None = (0.0, 1.0),
        inverse_temperature: float = 1.0,
        temperatures: Sequence[float] | None = None,
        noise: str = "float",
        levels: int = 255,
    ) -> None:
        if not callable(base_model):
            raise ValueError(f"base_model must be a callable nn.Module; got {type(base_model).__name__}")
        num_classes = _check_count("num_classes", num_classes)
        if num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes}")
        self.sigma = _check_positive("sigma", sigma)
        self.num_buckets = _check_count("num_buckets", num_buckets)
        self.inverse_temperature = _check_positive("inverse_temperature", inverse_temperature)
        if temperatures is not None:
            try:
                temps = tuple(float(t) for t in temperatures)
            except (TypeError, ValueError):
                temps = ()
            if not temps or not all(0 < t < math.inf for t in temps):
                raise ValueError(
                    f"temperatures must be None or finite numbers > 0 (at least one); got {temperatures!r}"
                )
            temperatures = temps
        self.temperatures: tuple[float, ...] | None = temperatures
        if input_shape is not None:
            try:
                input_shape = tuple(int(v) for v in input_shape)
            except (TypeError, ValueError):
                raise ValueError(f"input_shape must be a sequence of ints or None; got {input_shape!r}") from None
        if input_range is not None:
            try:
                low, high = (float(v) for v in input_range)
            except (TypeError, ValueError):
                raise ValueError(f"input_range must be None or a pair (low, high); got {input_range!r}") from None
            if not low <= high:
                raise ValueError(f"input_range must be None or (low, high) with low <= high; got {input_range!r}")
            input_range = (low, high)
        if noise not in sampling.NOISE_KINDS:
            kinds = ", ".join(repr(k) for k in sampling.NOISE_KINDS)
            raise ValueError(f"noise must be one of {kinds}; got {noise!r}")
        if noise == "grid":
            if lipschitz is not None and _check_lipschitz(lipschitz) != math.inf:
                raise ValueError(
                    "noise='grid' certifies a piecewise-constant grid classifier, so only hard votes are sound: "
                    f"lipschitz must be None or inf; got {lipschitz!r}"
                )
            lipschitz = math.inf
        self.base_model = base_model
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.input_range = input_range
        self.noise = noise
        self.grid = GridNoise(self.sigma, levels) if noise == "grid" else None
        if lipschitz is None:
            try:
                with _eval_mode(base_model):
                    lipschitz = lipschitz_upper_bound(base_model, input_shape=input_shape)
                logger.info("CPM: Lipschitz constant of the logits from lipschitz_upper_bound: L = %g", lipschitz)
            except TypeError as e:
                lipschitz = math.inf
                logger.info("CPM: the base model cannot be bounded (%s); using L = inf (hard votes, Cohen radius)", e)
        else:
            lipschitz = _check_lipschitz(lipschitz)
            logger.info("CPM: Lipschitz constant of the logits given: L = %g", lipschitz)
        self.lipschitz = float(lipschitz)
        self.score_lipschitz = softmax_score_lipschitz(self.lipschitz, self.inverse_temperature)

    @property
    def soft_votes(self) -> bool:
        """Whether the votes are drawn from the softmax (finite :math:`L`) rather than the hard argmax."""
        return math.isfinite(self.lipschitz)

    def _prepare(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor of shape (N, ...); got {type(x).__name__}")
        if self.input_shape is not None and tuple(x.shape) == self.input_shape:
            x = x.unsqueeze(0)
        if x.ndim < 2:
            raise ValueError(f"x must be a batch of shape (N, ...); got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (N, *{self.input_shape}); got {tuple(x.shape)}")
        check_values(x, self.input_range)
        return x.to(model_device(self.base_model, x.device))

    def certify(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: int | torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Certified predictions and :math:`\ell_2` radii for a batch ``x`` of shape ``(N, ...)``.

        Guarantee, for each image separately: with probability at least :math:`1 - \alpha` over the noise, either
        the answer is ``ABSTAIN`` (radius 0), or the returned class equals :math:`g(x)` and :math:`g` is constant
        on the open :math:`\ell_2` ball of radius :math:`R` around :math:`x`.

        Steps: ``n0`` selection draws choose :math:`A` and the buckets; ``n`` fresh draws give
        :math:`(\underline p_A, \overline p_B)` (:func:`cpm_bounds`) and :math:`R` = :func:`cpm_radius` with
        :math:`\ell` = ``score_lipschitz``; abstain when :math:`R = 0`.

        Args:
            x: inputs ``(N, ...)`` (or one input of shape ``input_shape``), finite, within ``input_range``.
            n0: selection draws per input, >= 1.
            n: estimation draws per input, >= 1.
            alpha: failure probability in (0, 1).
            batch_size: rows per forward pass, >= 1.
            generator: ``None``, an int seed, or a ``torch.Generator`` on the model's device.

        Returns:
            ``(prediction, radius)``: a long tensor and a float64 tensor of shape ``(N,)`` on the model's device.
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
        generator: int | torch.Generator | None = None,
    ) -> CPMCertificate:
        """Like :meth:`certify`, also returning the two bounds and the number of buckets used."""
        n0, n = _check_count("n0", n0), _check_count("n", n)
        batch_size = _check_count("batch_size", batch_size)
        alpha = _check_alpha(alpha)
        x = self._prepare(x)
        gen = sampling.make_generator(generator, x.device)
        if self.soft_votes and self.temperatures is not None:
            return self._certify_selected(x, n0, n, alpha, batch_size, gen)
        voter = _SoftmaxVote(self.base_model, self.inverse_temperature, gen) if self.soft_votes else self.base_model
        with _eval_mode(self.base_model):
            # Note [noise generator]: the estimation draws continue the generator, so they are fresh.
            sel = sampling.class_counts(voter, x, n0, self.sigma, self.num_classes, batch_size, gen, grid=self.grid)
            est = sampling.class_counts(voter, x, n, self.sigma, self.num_classes, batch_size, gen, grid=self.grid)
        bounds = cpm_bounds(
            sel.cpu().numpy(),
            est.cpu().numpy(),
            alpha,
            self.num_buckets,
            sigma=self.sigma,
            lipschitz=self.score_lipschitz,
        )
        if self.grid is not None:  # bounds for the drawn law, made ones for the rounded Gaussian
            dim = math.prod(x.shape[1:])
            bounds = bounds._replace(
                p_lower=self.grid.lower_bound(bounds.p_lower, dim), p_upper=self.grid.upper_bound(bounds.p_upper, dim)
            )
        radius = cpm_radius(bounds.p_lower, bounds.p_upper, self.sigma, self.score_lipschitz)
        certified = radius > 0
        prediction = np.where(certified, bounds.top, ABSTAIN)

        def out(a: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=x.device, dtype=dtype)

        return CPMCertificate(
            prediction=out(prediction, torch.long),
            radius=out(np.where(certified, radius, 0.0), torch.float64),
            p_lower=out(bounds.p_lower, torch.float64),
            p_upper=out(bounds.p_upper, torch.float64),
            num_buckets=out(bounds.num_buckets, torch.long),
            inverse_temperature=torch.full(
                (len(x),),
                self.inverse_temperature if self.soft_votes else math.inf,
                dtype=torch.float64,
                device=x.device,
            ),
        )

    def _certify_selected(
        self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, gen: torch.Generator
    ) -> CPMCertificate:
        """:meth:`certify_detailed` with the votes chosen per input (Note [temperature selection])."""
        temps = (math.inf, *self.temperatures)  # hard votes first: ties go to them
        ells = [softmax_score_lipschitz(self.lipschitz, s) if math.isfinite(s) else math.inf for s in temps]
        with _eval_mode(self.base_model):
            sel, freq = self._candidate_counts(x, n0, temps, batch_size, gen)
        predicted = np.stack(
            [
                predicted_radius(
                    sel[:, c], n, alpha, self.num_buckets, sigma=self.sigma, lipschitz=ell, frequencies=freq[:, c]
                )
                for c, ell in enumerate(ells)
            ],
            axis=1,
        )
        choice = predicted.argmax(axis=1)
        size = len(x)
        top, p_lower, p_upper = np.zeros(size, np.int64), np.zeros(size), np.ones(size)
        buckets, radius = np.ones(size, np.int64), np.zeros(size)
        for c in np.unique(choice):
            rows = np.flatnonzero(choice == c)
            s = temps[c]
            voter = _SoftmaxVote(self.base_model, s, gen) if math.isfinite(s) else self.base_model
            with _eval_mode(self.base_model):
                # Note [noise generator]: fresh draws, after every selection draw.
                est = sampling.class_counts(
                    voter, x[torch.as_tensor(rows, device=x.device)], n, self.sigma, self.num_classes, batch_size, gen
                )
            bounds = cpm_bounds(
                sel[rows, c], est.cpu().numpy(), alpha, self.num_buckets, sigma=self.sigma, lipschitz=ells[c]
            )
            top[rows], p_lower[rows], p_upper[rows], buckets[rows] = bounds
            radius[rows] = cpm_radius(bounds.p_lower, bounds.p_upper, self.sigma, ells[c])
        certified = radius > 0

        def out(a: np.ndarray, dtype: torch.dtype) -> Tensor:
            return torch.as_tensor(np.ascontiguousarray(a)).to(device=x.device, dtype=dtype)

        return CPMCertificate(
            prediction=out(np.where(certified, top, ABSTAIN), torch.long),
            radius=out(np.where(certified, radius, 0.0), torch.float64),
            p_lower=out(p_lower, torch.float64),
            p_upper=out(p_upper, torch.float64),
            num_buckets=out(buckets, torch.long),
            inverse_temperature=out(np.asarray(temps)[choice], torch.float64),
        )

    @torch.no_grad()
    def _candidate_counts(
        self, x: Tensor, num: int, temps: tuple[float, ...], batch_size: int, gen: torch.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Vote counts ``(N, len(temps), K)`` of every candidate on the same ``num`` noisy copies of each input
        (soft votes at each finite ``s``, each with its own Gumbel draws; hard votes at ``s = inf``), and the
        pessimistic vote frequencies the selection predicts from (same shape; Note [selection scores])."""
        k = self.num_classes
        soft = torch.tensor([s for s in temps if math.isfinite(s)], dtype=torch.float64, device=x.device)
        hard = [c for c, s in enumerate(temps) if not math.isfinite(s)]
        order = hard + [c for c, s in enumerate(temps) if math.isfinite(s)]  # rows of `votes` -> candidates
        slot = torch.as_tensor(order, device=x.device)
        counts = torch.zeros(len(x) * len(temps) * k, dtype=torch.long, device=x.device)
        shapes = {"p": (len(soft), k), "p2": (len(soft), k), "z": (k,), "zz": (k, k)}  # per input, summed over draws
        stats = {key: torch.zeros((len(x), *n), dtype=torch.float64, device=x.device) for key, n in shapes.items()}
        for index, logits in sampling.noisy_outputs(self.base_model, x, num, self.sigma, batch_size, gen):
            if logits.ndim != 2 or logits.shape[1] != k:
                raise ValueError(
                    f"the base model must return logits of shape (batch, num_classes) = ({len(index)}, {k}); "
                    f"got {tuple(logits.shape)}"
                )
            z = logits.to(torch.float64)
            u = torch.rand((len(soft), *z.shape), generator=gen, device=z.device, dtype=torch.float64)
            # Gumbel-max, as _SoftmaxVote: argmax(s z + G) ~ Categorical(softmax(s z)).
            votes = (soft[:, None, None] * z - torch.log(-torch.log(u))).argmax(dim=-1)
            votes = torch.cat([z.argmax(dim=-1).expand(len(hard), -1), votes])  # (candidates, B)
            flat = (index[None, :] * len(temps) + slot[:, None]) * k + votes
            counts.scatter_add_(0, flat.reshape(-1), torch.ones_like(flat).reshape(-1))
            probs = torch.softmax(soft[None, :, None] * z[:, None, :], dim=-1)  # (B, soft, K)
            for key, value in (("p", probs), ("p2", probs.square()), ("z", z), ("zz", z[:, :, None] * z[:, None, :])):
                stats[key].index_add_(0, index, value)
        counts = counts.view(len(x), len(temps), k).cpu().numpy()
        moments = {key: value.cpu().numpy() / num for key, value in stats.items()}
        freq = np.empty(counts.shape)
        for c, row in enumerate(order):
            top = counts[:, row].argmax(axis=1)
            if c < len(hard):
                freq[:, row] = _hard_frequencies(moments["z"], moments["zz"], top, num)
            else:
                j = c - len(hard)
                freq[:, row] = _soft_frequencies(moments["p"][:, j], moments["p2"][:, j], top, num)
        return counts, freq


# Note [selection scores]
# The selection only has to rank the candidates well; any rule keeps the certificate valid (the bounds come from
# fresh draws). Vote counts rank them badly where they matter most: with n0 = 100 draws, soft votes with
# p_A = 0.995 and hard votes with p_A = 0.9999 both show 100/100, yet with n = 100 000 estimation draws the
# second gives the larger radius. So the selection predicts from the scores behind the votes, on the same draws:
# a soft vote at s is a draw from softmax(s z), whose mean over the draws estimates p_A with far less noise than
# the votes; a hard vote is 1[z_A > z_k for all k], and modelling each margin z_A - z_k as Gaussian (its mean and
# standard deviation over the draws; t_k = mean / std) gives P(vote k) ~ Phi(-t_k) far beyond the 1/n0
# resolution of the counts. Each estimate is made pessimistic by one standard error, as predicted_radius does for
# counts (the mean lowered by std/sqrt(n0); t_k lowered by sqrt((1 + t_k^2/2)/n0), its delta-method error).
def _soft_frequencies(mean: np.ndarray, mean_sq: np.ndarray, top: np.ndarray, num: int) -> np.ndarray:
    """Mean softmax scores ``(N, K)`` with the ``top`` class's lowered by one standard error (Note [selection
    scores])."""
    top = top[:, None]
    p_top = np.take_along_axis(mean, top, axis=1)
    var = np.maximum(np.take_along_axis(mean_sq, top, axis=1) - p_top**2, 0.0) * num / max(num - 1, 1)
    return lower_top(mean, top, np.clip(p_top - np.sqrt(var / num), 0.0, 1.0))


def _hard_frequencies(z_mean: np.ndarray, zz_mean: np.ndarray, top: np.ndarray, num: int) -> np.ndarray:
    """Hard-vote probabilities ``(N, K)`` from a Gaussian model of the margins ``z_top - z_k`` (Note [selection
    scores])."""
    rows = np.arange(len(top))
    cov = (zz_mean - z_mean[:, :, None] * z_mean[:, None, :]) * num / max(num - 1, 1)
    mu = z_mean[rows, top][:, None] - z_mean
    var = np.maximum(cov[rows, top, top][:, None] + np.diagonal(cov, axis1=1, axis2=2) - 2 * cov[rows, top], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(var > 0, mu / np.sqrt(var), np.where(mu > 0, np.inf, np.where(mu < 0, -np.inf, 0.0)))
        t = t - np.where(np.isfinite(t), np.sqrt((1.0 + 0.5 * t**2) / num), 0.0)
    lose = scipy.stats.norm.sf(t)
    lose[rows, top] = 0.0
    total = lose.sum(axis=1, keepdims=True)
    lose = np.where(total > 1.0, lose / np.where(total > 1.0, total, 1.0), lose)
    lose[rows, top] = 1.0 - np.minimum(total[:, 0], 1.0)
    return lose
