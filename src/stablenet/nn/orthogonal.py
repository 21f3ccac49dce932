r"""Orthogonal dense layers: Björck–Bowie orthonormalisation and the Cayley transform.

An orthogonal (or, for rectangular shapes, semi-orthogonal) weight has all singular values equal to 1, so the
layer is 1-Lipschitz and, unlike a merely normalised one, preserves gradient norms.

* ``"bjorck"`` (Björck & Bowie 1971; used by Anil et al. 2019): first divide :math:`W` by its Gram-iteration
  upper bound, so every singular value lies in :math:`[0, 1]`, then iterate

  .. math:: W \leftarrow W\,(\tfrac32 I - \tfrac12 W^\top W),

  which maps each singular value by :math:`s \mapsto \tfrac32 s - \tfrac12 s^3` and keeps the singular vectors.
  That map is increasing on :math:`[0, 1]`, sends :math:`[0, 1]` into :math:`[0, 1]` and fixes 0 and 1, so in
  exact arithmetic the singular values rise towards 1 and **never exceed 1**, whatever the number of steps
  (an unconverged iteration is still 1-Lipschitz, only less orthogonal). The map also sends
  :math:`(1, \sqrt 3)` into :math:`(0, 1)`, so a pre-normalisation that rounds a hair below the true norm is
  harmless. Convergence is quadratic near 1 and geometric (factor 1.5) for small singular values, hence
  the orthogonal initialisation of :class:`OrthogonalLinear`.
* ``"cayley"``: :math:`Q = (I - A)(I + A)^{-1}` with :math:`A = W - W^\top` skew-symmetric, orthogonal for
  every :math:`W` (:math:`I + A` is always invertible: its eigenvalues are :math:`1 + i\lambda`). Computed as
  ``solve(I + A, I - A)`` (the two factors commute), never with an explicit inverse. The solve's rounding
  grows with the condition number of :math:`I + A`, so one Björck step follows (Note [Björck polish]). The
  free weight is a square :math:`d \times d` matrix, :math:`d = \max(\text{in}, \text{out})`, and the layer
  takes the ``out x in`` block of :math:`Q` (orthonormal rows or columns). As a parametrization of an
  ``out x in`` weight, the weight is zero-padded to :math:`d \times d` first.

# Note [Björck polish]
One Björck step :math:`Q \leftarrow Q(\tfrac32 I - \tfrac12 Q^H Q)` fixes (semi-)orthogonal matrices and maps a
singular value :math:`1 + \delta` to :math:`1 - \tfrac32\delta^2 - \tfrac12\delta^3`: below 1, and back to
rounding level. Both methods end with such a step computed in float64 (complex128), whatever the compute dtype,
so the rounding of the float32 work before it only enters squared. It matters: a float32 Cayley solve loses
accuracy with the condition number of :math:`I + A` (singular values off by 1.5e-4 for a 256-wide weight with
unit entries), and with TF32 matmuls on an H200 the float32 Björck and Cayley results were off by 5e-4, the
Fourier-domain Cayley transform by 7e-4. After the float64 step no singular value exceeded 1 by more than 4e-8
in any of these cases (TF32 included); values below 1 move to :math:`1 - \tfrac32\delta^2` (a 1024-wide
Cayley solve under TF32, whose blocked LU uses TF32 products, still ends at 0.983: 1-Lipschitz, less
orthogonal). It costs two float64 matrix products (1024 x 1024 Björck, 25 steps, forward and backward: 12 ms
on an H200). Being a polynomial in :math:`Q` and :math:`Q^H`, it keeps the Hermitian symmetry of
Fourier-domain transforms (``stablenet.nn.cayley_conv``).

The result is orthogonal up to the rounding of the final float64 step and of the cast to the weight's dtype
(measured excess about 3e-7 in float32 at width 256, see ``tests/nn/test_orthogonal.py``).

Example:
    >>> layer = OrthogonalLinear(6, 6).double()
    >>> s = torch.linalg.svdvals(layer.constrained_weight())
    >>> bool(torch.allclose(s, torch.ones(6, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stablenet.nn.constrained import ConstrainedLinear, Constraint, register_constraint, remove_constraint
from stablenet.spectral.dense import gram_iteration

__all__ = [
    "BJORCK_ITERS",
    "ORTHOGONAL_METHODS",
    "OrthogonalConstraint",
    "OrthogonalLinear",
    "bjorck",
    "cayley",
    "lipschitz_orthogonal",
    "polish",
    "remove_lipschitz_orthogonal",
]

ORTHOGONAL_METHODS = ("bjorck", "cayley")
#: Default number of Björck steps: from an orthogonal-ish start a handful suffice; 25 also bring the singular
#: values of random square Gaussian matrices (64 to 256 wide) to 1 within float64 rounding.
BJORCK_ITERS = 25
#: Gram iterations of the pre-normalisation: any upper bound works (Note in the module docstring).
_PRENORM_GRAM_ITERS = 6


def bjorck(weight: Tensor, n_iter: int = BJORCK_ITERS) -> Tensor:
    r"""Björck–Bowie orthonormalisation of ``weight`` ``(m, n)`` after Gram pre-normalisation (differentiable).

    Every singular value of the result is in :math:`[0, 1]` in exact arithmetic (module docstring). The last of
    the ``n_iter`` steps runs in float64 (Note [Björck polish]).
    """
    sigma = gram_iteration(weight, _PRENORM_GRAM_ITERS)
    w = weight / torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    for _ in range(n_iter - 1):
        w = _bjorck_step(w)
    return polish(w) if n_iter > 0 else w


def _bjorck_step(w: Tensor) -> Tensor:
    """``W (1.5 I - 0.5 W^H W)``, on the smaller Gram side (``(1.5 I - 0.5 W W^H) W`` is the same matrix)."""
    if w.shape[-2] >= w.shape[-1]:
        return 1.5 * w - 0.5 * (w @ (w.mH @ w))
    return 1.5 * w - 0.5 * ((w @ w.mH) @ w)


def polish(q: Tensor) -> Tensor:
    """One Björck step in float64 (complex128), returned in ``q``'s dtype: Note [Björck polish]."""
    wide = torch.complex128 if q.is_complex() else torch.float64
    return _bjorck_step(q.to(wide)).to(q.dtype)


def cayley(weight: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
    r"""The ``shape`` block (default ``weight.shape``) of the Cayley transform of :math:`W - W^\top`.

    ``weight`` is zero-padded to a square of side ``max`` of all dimensions first.
    """
    rows, cols = shape if shape is not None else tuple(weight.shape)
    d = max(rows, cols, *weight.shape)
    w = nn.functional.pad(weight, (0, d - weight.shape[1], 0, d - weight.shape[0]))
    a = w - w.mT
    eye = torch.eye(d, dtype=weight.dtype, device=weight.device)
    q = torch.linalg.solve(eye + a, eye - a)[:rows, :cols]
    return polish(q)


def _check_method(method: str) -> str:
    if method not in ORTHOGONAL_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, ORTHOGONAL_METHODS))}; got {method!r}")
    return method


class OrthogonalConstraint(Constraint):
    """Maps a free weight to an orthogonal (semi-orthogonal) one by Björck iterations or the Cayley transform.

    Args:
        method: ``"bjorck"`` or ``"cayley"``.
        n_iter: Björck steps (default :data:`BJORCK_ITERS`); not used by ``"cayley"``.
        shape: ``(out, in)`` of the result for ``"cayley"`` when the free weight is the square ``d x d`` one;
            default: the free weight's shape.
    """

    def __init__(self, method: str = "bjorck", n_iter: int | None = None, shape: tuple[int, int] | None = None):
        super().__init__()
        self.method = _check_method(method)
        if n_iter is not None and (not isinstance(n_iter, int) or n_iter < 1):
            raise ValueError(f"n_iter must be None or a positive int; got {n_iter!r}")
        self.n_iter = BJORCK_ITERS if n_iter is None else n_iter
        self.shape = shape

    def constrain(self, weight: Tensor) -> Tensor:
        if weight.dim() != 2:
            raise ValueError(f"an orthogonal constraint needs a 2-D weight; got shape {tuple(weight.shape)}")
        if self.method == "bjorck":
            return bjorck(weight, self.n_iter)
        return cayley(weight, self.shape)

    def extra_repr(self) -> str:
        return f"method={self.method!r}" + (f", n_iter={self.n_iter}" if self.method == "bjorck" else "")


class OrthogonalLinear(ConstrainedLinear):
    r"""``nn.Linear`` with an orthogonal weight (orthonormal rows or columns): 1-Lipschitz, gradient-norm preserving.

    Args:
        in_features, out_features, bias, device, dtype: as in ``nn.Linear``.
        method: ``"bjorck"`` (free weight ``out x in``, initialised orthogonal) or ``"cayley"`` (free weight
            ``d x d``, :math:`d = \max(\text{in}, \text{out})`).
        n_iter: Björck steps (default :data:`BJORCK_ITERS`).

    Example:
        >>> layer = OrthogonalLinear(4, 9, method="cayley").double()
        >>> x = torch.randn(2, 4, dtype=torch.float64)
        >>> bool(torch.allclose((layer(x) - layer.bias).norm(dim=1), x.norm(dim=1)))
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        method: str = "bjorck",
        n_iter: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_method(method)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.method = method
        self.constraint = OrthogonalConstraint(method, n_iter, (out_features, in_features))
        if method == "cayley":
            d = max(in_features, out_features)
            self.weight = nn.Parameter(torch.empty(d, d, device=self.weight.device, dtype=self.weight.dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        method = getattr(self, "method", None)
        if method is None:  # called by nn.Linear.__init__, before the method is known
            super().reset_parameters()
            return
        with torch.no_grad():
            if method == "bjorck":
                nn.init.orthogonal_(self.weight)
            else:
                # entries ~ U(-1/sqrt(d), 1/sqrt(d)): ||A|| = O(1), a Q well away from the identity
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={self.method!r}"


def lipschitz_orthogonal(
    module: nn.Module, name: str = "weight", method: str = "bjorck", n_iter: int | None = None
) -> nn.Module:
    """Make ``module.<name>`` of an ``nn.Linear`` orthogonal, as a parametrization; returns ``module``.

    ``"cayley"`` zero-pads the ``out x in`` weight to a square before the transform (module docstring).

    Raises:
        ValueError: for a module other than ``nn.Linear``, an unknown method or a tensor that is not 2-D.

    Example:
        >>> lin = lipschitz_orthogonal(nn.Linear(5, 5).double())
        >>> bool(torch.allclose(lin.weight @ lin.weight.T, torch.eye(5, dtype=torch.float64)))
        True
    """
    if not isinstance(module, nn.Linear):
        raise ValueError(f"lipschitz_orthogonal supports nn.Linear; got {type(module).__name__}")
    _check_method(method)
    tensor = getattr(module, name, None)
    if isinstance(tensor, Tensor) and tensor.dim() != 2:
        raise ValueError(f"{type(module).__name__}.{name} must be 2-D; got shape {tuple(tensor.shape)}")
    return register_constraint(module, name, OrthogonalConstraint(method, n_iter))


def remove_lipschitz_orthogonal(module: nn.Module, name: str = "weight") -> nn.Module:
    """Take off :func:`lipschitz_orthogonal`, keeping the orthogonal value as a plain parameter.

    Raises:
        ValueError: when ``module.<name>`` has no orthogonal parametrization.
    """
    return remove_constraint(module, name, OrthogonalConstraint)
