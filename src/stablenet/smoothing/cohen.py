r"""Randomized smoothing of Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized
Smoothing", arXiv 1902.02918: ``CERTIFY`` and ``PREDICT``, batched over images and noise draws.

The smoothed classifier of a base classifier :math:`f` at noise level :math:`\sigma` is

.. math::

    g(x) = \arg\max_c \; \mathbb P_{\delta \sim \mathcal N(0, \sigma^2 I)}\big(f(x + \delta) = c\big).

Theorem 1 of the paper: if :math:`\mathbb P(f(x+\delta) = c_A) \ge \underline p_A > \tfrac12`, then
:math:`g(x + \varepsilon) = c_A` for every :math:`\|\varepsilon\|_2 < \sigma\,\Phi^{-1}(\underline p_A)`.
:meth:`Smooth.certify` estimates :math:`\underline p_A` from Monte-Carlo counts, so its answer holds with
probability at least :math:`1 - \alpha` over the noise, for each image separately.

The theorem is about a *real* Gaussian :math:`\delta`; the counts come from floating-point samples (Note
[floating-point noise] in :mod:`~stablenet.smoothing.sampling`). With the default ``noise="float"`` the
certificate therefore also assumes that the base model's decisions do not depend on how :math:`x + \delta` was
rounded, which a base model that reads the low-order bits of its input can violate (Voráček & Hein 2023,
arXiv 2207.07209). With ``noise="grid"`` (inputs on the grid :math:`\{k/L\}`) it holds without that
assumption, for the base classifier :math:`f(\mathrm{round}(L\,\cdot)/L)`, assuming only fair random bits.

Sampling lives in :mod:`stablenet.smoothing.sampling`, the confidence bounds and the (rounded-down) radius in
:mod:`stablenet.smoothing.stats`; this module only ties them together.

# Note [eval mode]
The Monte-Carlo argument needs the noisy copies to be classified independently by one fixed :math:`f`. A
BatchNorm layer in training mode couples the rows of a batch and dropout changes :math:`f` from row to row, so
:class:`Smooth` runs the base model in eval mode and afterwards restores each submodule's own ``training`` flag.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor, nn

from stablenet.abstain import ABSTAIN
from stablenet.smoothing import sampling, stats
from stablenet.smoothing.arguments import check_alpha as _check_alpha
from stablenet.smoothing.arguments import check_count as _check_count
from stablenet.smoothing.arguments import check_values, model_device
from stablenet.smoothing.arguments import eval_mode as _eval_mode
from stablenet.smoothing.grid_noise import GridNoise

__all__ = ["ABSTAIN", "Smooth"]


class Smooth:
    r"""The smoothed classifier :math:`g` of a base classifier, with Cohen et al.'s certify and predict.

    .. math::

        g(x) = \arg\max_c \; \mathbb P\big(f(x + \delta) = c\big), \qquad \delta \sim \mathcal N(0, \sigma^2 I),

    where :math:`f(x) = \arg\max_k \mathrm{base\_model}(x)_k`. Both methods take a batch ``(N, C, H, W)`` (or
    one image ``(C, H, W)``, treated as ``N = 1``) and answer per image; the guarantees hold for each image
    separately, not jointly over the batch.

    Args:
        base_model: Maps ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits. Run in eval mode (Note
            [eval mode]); its device (that of its first parameter or buffer, else that of the input) is where
            the noise is drawn and the results are returned.
        num_classes: Number of classes, at least 2.
        sigma: Standard deviation of the Gaussian noise, > 0.
        input_range: Inclusive ``(low, high)`` bounds that every input value must lie in (images in
            ``[0, 1]`` by default), or ``None`` for no range check. Noisy copies are *not* clipped to it.
        noise: ``"float"`` (``torch.randn`` in at least float32: the usual practice, sound only if the base
            model ignores rounding) or ``"grid"`` (the exact rounded Gaussian of
            :class:`~stablenet.smoothing.grid_noise.GridNoise`: sound for inputs on the grid ``k / levels``, at
            about 3 times the noise cost, and bounds widened by its ``tv_bound``); see Note [floating-point
            noise] in :mod:`~stablenet.smoothing.sampling`.
        levels: Grid steps per input unit for ``noise="grid"`` (255 for 8-bit images); unused otherwise.

    Example:
        >>> smooth = Smooth(model, num_classes=10, sigma=0.25)
        >>> prediction, radius = smooth.certify(images, n0=100, n=100_000, alpha=0.001, batch_size=1000)
        >>> # for each i, with probability >= 0.999: prediction[i] == ABSTAIN (and radius[i] == 0), or
        >>> # g(images[i] + e) == prediction[i] for every ||e||_2 < radius[i]
    """

    def __init__(
        self,
        base_model: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        input_range: tuple[float, float] | None = (0.0, 1.0),
        noise: str = "float",
        levels: int = 255,
    ) -> None:
        if not callable(base_model):
            raise ValueError(f"base_model must be a callable nn.Module; got {type(base_model).__name__}")
        if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, numbers.Integral):
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
        if (
            isinstance(sigma, (bool, np.bool_))
            or not isinstance(sigma, numbers.Real)
            or not math.isfinite(sigma)
            or sigma <= 0
        ):
            raise ValueError(f"sigma must be a finite float > 0; got {sigma!r}")
        if input_range is not None:
            try:
                low, high = (float(v) for v in input_range)
            except (TypeError, ValueError):
                raise ValueError(f"input_range must be None or a pair (low, high); got {input_range!r}") from None
            if not low <= high:  # also rejects NaN
                raise ValueError(
                    f"input_range must be None or a pair (low, high) with low <= high; got {input_range!r}"
                )
            input_range = (low, high)
        if noise not in sampling.NOISE_KINDS:
            kinds = ", ".join(repr(k) for k in sampling.NOISE_KINDS)
            raise ValueError(f"noise must be one of {kinds}; got {noise!r}")
        self.base_model = base_model
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.input_range = input_range
        self.noise = noise
        self.grid = GridNoise(self.sigma, levels) if noise == "grid" else None

    def _prepare(self, x: Tensor) -> Tensor:
        """Check ``x`` and return it as a batch ``(N, C, H, W)`` on the model's device."""
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape (N, C, H, W) or (C, H, W); got {type(x).__name__}")
        if x.ndim not in (3, 4):
            raise ValueError(f"x must have shape (N, C, H, W) or (C, H, W); got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        x = x.to(model_device(self.base_model, x.device))
        if x.ndim == 3:
            x = x.unsqueeze(0)
        check_values(x, self.input_range)
        return x

    def _counts(self, x: Tensor, num: int, batch_size: int, generator: torch.Generator) -> Tensor:
        return sampling.class_counts(
            self.base_model, x, num, self.sigma, self.num_classes, batch_size, generator, grid=self.grid
        )

    def certify(
        self,
        x: Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: int | torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Cohen et al.'s ``CERTIFY``: a prediction of :math:`g` and an :math:`\ell_2` radius around it, per image.

        Guarantee, for each image :math:`x` separately: with probability at least :math:`1 - \alpha` over the
        noise, either the answer is ``ABSTAIN`` (radius 0), or the returned class equals :math:`g(x)` and
        :math:`g` is constant on the open :math:`\ell_2` ball of radius :math:`R` around :math:`x`.

        Steps: the guess :math:`\hat c` is the most frequent class of :math:`f` over ``n0`` noisy copies; then
        ``n`` *fresh* noisy copies (the generator continues, Note [noise generator] in
        :mod:`~stablenet.smoothing.sampling`) give the count :math:`n_A` of :math:`\hat c`, and

        .. math::

            \underline p_A = \mathrm{B}(\alpha;\, n_A,\, n - n_A + 1), \qquad
            R = \sigma\,\Phi^{-1}(\underline p_A) \quad \text{if } \underline p_A > \tfrac12,

        the one-sided Clopper–Pearson lower bound (:math:`\mathrm B(\cdot; a, b)` the beta quantile). If
        :math:`\underline p_A \le \tfrac12` the answer is ``ABSTAIN``. :math:`R` is rounded down (Note
        [rounding down] in :mod:`~stablenet.smoothing.stats`). With ``noise="grid"``, :math:`\underline p_A`
        is first lowered by the grid noise's ``tv_bound`` for one input (Note [floating-point noise] in
        :mod:`~stablenet.smoothing.sampling`), and the guarantee is about the grid classifier.

        Args:
            x: Images ``(N, C, H, W)`` or one image ``(C, H, W)``, finite and within ``input_range``.
            n0: Number of noisy copies per image used to select :math:`\hat c` (>= 1).
            n: Number of noisy copies per image used to estimate :math:`\underline p_A` (>= 1).
            alpha: Failure probability, in ``(0, 1)``.
            batch_size: Rows per forward pass of the base model (>= 1); several images share a batch when
                ``n0`` or ``n`` is smaller.
            generator: ``None`` (fresh randomness), an int seed, or a ``torch.Generator`` on the model's device
                (its state advances).

        Returns:
            ``(prediction, radius)``: a long tensor ``(N,)`` of classes or ``ABSTAIN`` and a float64 tensor
            ``(N,)`` of radii (0 where abstaining), both on the model's device.
        """
        n0, n = _check_count("n0", n0), _check_count("n", n)
        batch_size = _check_count("batch_size", batch_size)
        alpha = _check_alpha(alpha)
        x = self._prepare(x)
        gen = sampling.make_generator(generator, x.device)
        with _eval_mode(self.base_model):
            c_hat = self._counts(x, n0, batch_size, gen).argmax(dim=1)
            counts = self._counts(x, n, batch_size, gen)
        n_a = counts.gather(1, c_hat.unsqueeze(1)).squeeze(1)
        p_lower = stats.clopper_pearson_lower(n_a.cpu().numpy(), n, alpha)
        if self.grid is not None:  # a bound for the drawn law, made one for the rounded Gaussian
            p_lower = self.grid.lower_bound(p_lower, math.prod(x.shape[1:]))
        certified = p_lower > 0.5
        radius = np.where(certified, stats.cohen_radius(p_lower, self.sigma), 0.0)
        prediction = torch.where(torch.as_tensor(certified, device=x.device), c_hat, torch.full_like(c_hat, ABSTAIN))
        return prediction, torch.as_tensor(radius, dtype=torch.float64, device=x.device)

    def predict(
        self,
        x: Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        generator: int | torch.Generator | None = None,
    ) -> Tensor:
        r"""Cohen et al.'s ``PREDICT``: the class of :math:`g`, or ``ABSTAIN`` when the vote is too close.

        Guarantee, for each image :math:`x` separately: the probability (over the noise) that the answer is a
        class other than :math:`g(x)` is at most :math:`\alpha`; otherwise it is :math:`g(x)` or ``ABSTAIN``.

        With :math:`n_1 \ge n_2` the two largest class counts over ``n`` noisy copies, the answer is the top
        class when the two-sided binomial test of :math:`n_1` successes in :math:`n_1 + n_2` trials against
        :math:`p = \tfrac12` has p-value :math:`\le \alpha`, and ``ABSTAIN`` otherwise. With ``noise="grid"``
        the test runs at :math:`\alpha - n\eta`, :math:`\eta` the grid noise's ``tv_bound`` for one input, since
        the ``n`` drawn copies are within :math:`n\eta` of the rounded Gaussian's in total variation.

        Args:
            x: Images ``(N, C, H, W)`` or one image ``(C, H, W)``, finite and within ``input_range``.
            n: Number of noisy copies per image (>= 1).
            alpha: Failure probability, in ``(0, 1)``.
            batch_size: Rows per forward pass of the base model (>= 1).
            generator: ``None`` (fresh randomness), an int seed, or a ``torch.Generator`` on the model's device.

        Returns:
            A long tensor ``(N,)`` of classes or ``ABSTAIN``, on the model's device.
        """
        n = _check_count("n", n)
        batch_size = _check_count("batch_size", batch_size)
        alpha = _check_alpha(alpha)
        x = self._prepare(x)
        if self.grid is not None:
            alpha = alpha - n * self.grid.tv_bound(math.prod(x.shape[1:]))
            if not alpha > 0:
                raise ValueError(f"n = {n} draws of grid noise leave no room in alpha; use a smaller n")
        gen = sampling.make_generator(generator, x.device)
        with _eval_mode(self.base_model):
            counts = self._counts(x, n, batch_size, gen)
        top = counts.topk(2, dim=1)
        values = top.values.cpu().numpy()
        pvalues = np.array([stats.binomial_test_pvalue(a, b) for a, b in values], dtype=np.float64)
        significant = torch.as_tensor(pvalues <= alpha, device=x.device)
        best = top.indices[:, 0]
        return torch.where(significant, best, torch.full_like(best, ABSTAIN))
