r"""Sharpness-aware minimisation: SAM (Foret et al. 2021) and adaptive SAM (Kwon et al. 2021).

SAM minimises the worst loss in a ball around the weights,

.. math::

    \min_w \max_{\|T_w^{-1}\epsilon\|_2 \le \rho} L(w + \epsilon),

with :math:`T_w = I` for SAM and :math:`T_w = \operatorname{diag}(|w| + \eta)` for ASAM. To first order the
inner maximiser is

.. math::

    \hat\epsilon(w) = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|_2}, \qquad g = \nabla L(w),

(for SAM :math:`\rho\, g / \|g\|_2`), and one step is: ascend to :math:`w + \hat\epsilon`, take the gradient
there, go back to :math:`w` and let the base optimiser step from :math:`w` with that gradient. The norm is
taken over all parameters together. Following Kwon et al.'s reference code, ASAM normalises only *weights*:
a parameter whose name lacks ``"weight"`` (a bias) gets :math:`T = 1`. Names are known when the optimiser is
given ``model.named_parameters()``; with plain tensors every parameter is treated as a weight (put biases in
a group with ``sam_adaptive=False`` to exempt them).

The known pitfalls are handled as follows.

* ``rho = 0`` skips the perturbation entirely: the update is bit for bit the base optimiser's.
* **Weight decay** is applied once, by the base optimiser in its own step. The ascent uses the gradient as
  computed by ``backward`` (no decay term), as in the reference implementation of Foret et al.
* **Restoring** :math:`w` copies the saved weights back (subtracting :math:`\hat\epsilon` would round).
* **BatchNorm** running statistics must be updated by the first forward only: wrap the second forward in
  :func:`sam_bn_guard` (:func:`sam_step` does; ``stablenet.train`` uses :func:`sam_step`).
* **DDP**: the ascent gradient stays local to each rank, as in the paper (Note [SAM and DDP]).
* **AMP**: with a ``GradScaler`` a non-finite ascent gradient leaves the weights unperturbed and the step is
  skipped by the scaler (Note [SAM and AMP]).

# Note [SAM and DDP]
Foret et al. perturb each replica with its own mini-batch gradient ("m-sharpness"); all-reducing the ascent
gradient also costs a second communication per step. The first backward therefore runs inside
``model.no_sync()`` and only the second one (at :math:`w + \hat\epsilon`) is averaged across ranks, so the
base step is identical on every rank. :func:`sam_step` does this for any model that has ``no_sync``
(``DistributedDataParallel``, FSDP).

# Note [SAM and AMP]
With a loss scale :math:`s` the first backward gives :math:`s g`. Unscaling is not needed for the ascent:
:math:`\hat\epsilon` is homogeneous of degree 0 in :math:`g`, so :math:`\rho\, T^2 (s g) / \|T s g\|` is the
unscaled direction (bit for bit when :math:`s` is a power of two, as GradScaler's is), and the norm is
accumulated in at least float32, where a scaled gradient that is finite has a finite norm in practice. What
the scale does require is a finiteness check: if :math:`s g` is not finite, the weights are not perturbed,
but the second pass still runs (at :math:`w`, where it overflows again) and ``GradScaler.step`` skips the
base step and backs the scale off. Running the second pass keeps the collective calls of all DDP ranks
matched, and the skip is decided on the all-reduced gradient, hence the same on every rank. The user calls
``scaler.update()`` as usual.

References:
    Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021 (arXiv 2010.01412).
    Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
    Neural Networks", ICML 2021 (arXiv 2102.11600).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["ASAM", "SAM", "sam_bn_guard", "sam_step"]

_SAM_KEYS = ("sam_rho", "sam_adaptive", "sam_eta")
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_CLOSURE_CONTRACT = (
    "SAM.step needs a closure that computes the loss, calls backward on it and returns it; it is called at w "
    "and again at w + eps (gradients are zeroed before each call); or call first_step() and second_step()"
)


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def _normalise_group(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``group`` with ``params`` as a list of tensors; ``(name, tensor)`` pairs go to ``param_names``."""
    group = dict(group)
    params = group.get("params")
    if params is None:
        raise ValueError("a param group must be a dict with a 'params' entry")
    params = [params] if isinstance(params, Tensor) else list(params)
    if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
        group["param_names"] = [name for name, _ in params]
        params = [p for _, p in params]
    group["params"] = params
    return group


class SAM(Optimizer):
    r"""Sharpness-aware minimisation around any base optimiser (Foret et al. 2021; ASAM with ``adaptive=True``).

    Each step perturbs the weights to :math:`w + \hat\epsilon` with

    .. math::

        \hat\epsilon = \rho\, \frac{T^2 g}{\|T g\|_2}, \qquad
        T = \begin{cases} I & \text{SAM} \\ \operatorname{diag}(|w| + \eta) & \text{ASAM (weights; 1 for biases)}
        \end{cases}

    takes the gradient :math:`g' = \nabla L(w + \hat\epsilon)`, restores :math:`w` exactly and lets the base
    optimiser step from :math:`w` with :math:`g'`. A zero gradient gives :math:`\hat\epsilon = 0`.

    ``param_groups`` and ``state`` *are* the base optimiser's, so learning-rate schedulers, ``state_dict`` and
    per-group options work as for the base optimiser. SAM's own options live in each group as ``sam_rho``,
    ``sam_adaptive`` and ``sam_eta`` (prefixed so that they cannot clash with a base option such as
    Adadelta's ``rho``) and may be set per group.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``, which lets ASAM tell biases
            apart) or param-group dicts.
        base_optimizer: an optimiser class or a factory ``f(param_groups, **base_kwargs) -> Optimizer``
            (e.g. ``torch.optim.SGD`` or ``functools.partial(torch.optim.AdamW, betas=(0.9, 0.99))``).
        rho: radius :math:`\rho \ge 0` of the neighbourhood; 0 gives exactly the base optimiser.
        adaptive: ASAM's elementwise normalisation :math:`T = |w| + \eta`.
        eta: ASAM's offset :math:`\eta \ge 0`, which keeps zero weights perturbable.
        **base_kwargs: passed to ``base_optimizer`` (``lr``, ``momentum``, ``weight_decay`` ...).

    Raises:
        ValueError: for a negative or non-finite ``rho`` or ``eta``, or a ``base_optimizer`` that is neither an
            optimiser class nor a factory returning an optimiser over the given groups.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def closure():
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)  # loss at w; the update used the gradient at w + eps

        The same step by hand, with DDP's ``no_sync`` for the ascent pass (Note [SAM and DDP]) and the
        BatchNorm guard for the second forward; :func:`sam_step` packages exactly this::

            with ddp_model.no_sync():
                loss_fn(ddp_model(x), y).backward()   # local gradient at w
            opt.first_step(zero_grad=True)            # w -> w + eps
            with sam_bn_guard(ddp_model):
                loss_fn(ddp_model(x), y).backward()   # all-reduced gradient at w + eps
            opt.second_step(zero_grad=True)           # back to w, base step
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        _check_nonnegative("rho", rho)
        _check_nonnegative("eta", eta)
        if isinstance(base_optimizer, Optimizer) or not callable(base_optimizer):
            raise ValueError(
                "base_optimizer must be an Optimizer class or a factory param_groups -> Optimizer "
                f"(e.g. torch.optim.SGD); got {base_optimizer!r}"
            )
        if isinstance(params, Tensor):
            raise ValueError("params must be an iterable of tensors, (name, tensor) pairs or dicts; got a Tensor")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        sam_defaults = {"sam_rho": rho, "sam_adaptive": bool(adaptive), "sam_eta": eta}
        super().__init__([_normalise_group(g) for g in groups], sam_defaults)

        wanted = [p for group in self.param_groups for p in group["params"]]
        base = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(base, Optimizer):
            raise ValueError(f"base_optimizer must return a torch.optim.Optimizer; got {type(base).__name__}")
        got = [p for group in base.param_groups for p in group["params"]]
        if len(got) != len(wanted) or any(a is not b for a, b in zip(got, wanted, strict=True)):
            raise ValueError("base_optimizer must build the optimiser over the param_groups it is given")
        self.base_optimizer = base
        # Shared, not copied: a scheduler or a user editing sam.param_groups edits the base optimiser's.
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = {**base.defaults, **sam_defaults}
        self._saved: dict[Tensor, Tensor] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (to the base optimiser once it exists); SAM options default to the constructor's."""
        group = _normalise_group(param_group)
        for key in ("sam_rho", "sam_eta"):
            if key in group:
                _check_nonnegative(key, group[key])
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called by Optimizer.__init__, before the base optimiser exists
            super().add_param_group(group)
            return
        for key in _SAM_KEYS:
            group.setdefault(key, self.defaults[key])
        base.add_param_group(group)

    def _perturbs(self) -> bool:
        return any(group["sam_rho"] > 0 for group in self.param_groups)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        r"""Move the weights to :math:`w + \hat\epsilon` using the current gradients; no-op when ``rho == 0``.

        Args:
            zero_grad: zero the gradients afterwards, ready for the backward pass at :math:`w + \hat\epsilon`.
            scaler: the ``GradScaler`` that scaled the loss; a non-finite gradient then leaves the weights
                unperturbed (Note [SAM and AMP]). Without a scaler gradients are not checked.
        """
        if self._saved:
            raise RuntimeError("first_step() was called twice; call second_step() to restore the weights first")
        if self._perturbs():
            self._ascend(scaler)
        if zero_grad:
            self.zero_grad()

    def _ascend(self, scaler: torch.amp.GradScaler | None) -> None:
        check_finite = scaler is not None and scaler.is_enabled()
        terms: list[tuple[dict[str, Any], Tensor, Tensor, Tensor | None]] = []  # (group, p, T g, T)
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                g = p.grad  # possibly scaled by s: the direction does not depend on s (Note [SAM and AMP])
                t = None
                if group["sam_adaptive"] and (names is None or "weight" in names[i]):
                    t = p.detach().abs().add_(group["sam_eta"])
                terms.append((group, p, g if t is None else g * t, t))
        if not terms:
            return
        device = terms[0][1].device  # one device for the total, in case of model parallelism
        norms = [
            torch.linalg.vector_norm(tg, dtype=torch.promote_types(tg.dtype, torch.float32)) for _, _, tg, _ in terms
        ]
        dtype = norms[0].dtype
        for n in norms[1:]:
            dtype = torch.promote_types(dtype, n.dtype)
        norm = torch.linalg.vector_norm(torch.stack([n.to(device=device, dtype=dtype) for n in norms]))
        if check_finite and not bool(torch.isfinite(norm)):
            return  # Note [SAM and AMP]: GradScaler skips the base step after the second pass
        inv_norm = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
        for group, p, tg, t in terms:
            if group["sam_rho"] == 0:
                continue
            eps = tg if t is None else tg * t
            eps = eps * (group["sam_rho"] * inv_norm).to(p.device)
            self._saved[p] = p.detach().clone()
            p.add_(eps)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> Any:
        """Restore the weights saved by :meth:`first_step` and take the base step with the current gradients.

        Args:
            zero_grad: zero the gradients after the step.
            scaler: the ``GradScaler`` that scaled the loss; the step is ``scaler.step(base_optimizer)``, which
                unscales and skips non-finite steps. Call ``scaler.update()`` afterwards as usual.

        Returns:
            What the base optimiser's ``step`` returns.
        """
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()
        out = self.base_optimizer.step() if scaler is None else scaler.step(self.base_optimizer)
        # LR schedulers watch this optimiser's step() to check the call order; first/second_step count as one.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()
        return out

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, scaler: torch.amp.GradScaler | None = None
    ) -> Any:
        r"""One full SAM step; ``closure`` computes the loss, calls backward and returns the loss.

        The closure is called at :math:`w` and, when some ``rho > 0``, again at :math:`w + \hat\epsilon`;
        gradients are zeroed before each call. With a ``GradScaler`` the closure calls
        ``scaler.scale(loss).backward()`` and the caller runs ``scaler.update()`` after the step. For
        BatchNorm and DDP use :func:`sam_step`, which also guards the running statistics and the gradient sync.

        Returns:
            The closure's value at :math:`w`.

        Raises:
            ValueError: without a closure.
        """
        if closure is None:
            raise ValueError(_CLOSURE_CONTRACT)
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        loss = closure()
        if self._perturbs():
            self.first_step(zero_grad=True, scaler=scaler)
            closure()
        self.second_step(scaler=scaler)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state dict (its state and the shared param groups with SAM's options)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimiser; groups saved without SAM options (plain optimiser) get the defaults."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for key in _SAM_KEYS:
                group.setdefault(key, self.defaults[key])

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer, "_saved": self._saved}


class ASAM(SAM):
    r"""Adaptive SAM (Kwon et al. 2021): SAM with the scale-invariant neighbourhood :math:`\|T_w^{-1}\epsilon\|
    \le \rho`, :math:`T_w = \operatorname{diag}(|w| + \eta)`.

    .. math::

        \hat\epsilon = \rho\, \frac{T_w^2\, g}{\|T_w\, g\|_2}

    Rescaling a ReLU layer's weights by :math:`c` and the next one's by :math:`1/c` leaves the adaptive
    sharpness unchanged, unlike SAM's. Biases get :math:`T = 1` when parameters are passed with names
    (``model.named_parameters()``), as in the authors' code. The default :math:`\rho = 0.5` is theirs for
    CIFAR; the neighbourhood is relative, so :math:`\rho` is larger than SAM's.

    Args:
        params: as for :class:`SAM`.
        base_optimizer: as for :class:`SAM`.
        rho: radius of the normalised neighbourhood.
        eta: offset :math:`\eta \ge 0` in :math:`T_w`.
        **base_kwargs: passed to ``base_optimizer``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ASAM(model.named_parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
        >>> opt.param_groups[0]["sam_adaptive"]
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[Optimizer] | Callable[..., Optimizer],
        rho: float = 0.5,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **base_kwargs)


@contextlib.contextmanager
def sam_bn_guard(model: nn.Module) -> Iterator[None]:
    """Leave running statistics (BatchNorm, InstanceNorm with tracking) unchanged by forwards inside the block.

    SAM runs two forwards per step; wrap the second one (at :math:`w + \\hat\\epsilon`) so that the statistics
    are updated once per step, from the unperturbed weights, exactly as without SAM. ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are copied on entry and written back on exit, which is exact
    and also right for cumulative averaging (``momentum=None``). Normalisation inside the block is unchanged
    (batch statistics in train mode).

    Example:
        >>> model = torch.nn.BatchNorm1d(2)
        >>> with sam_bn_guard(model):
        ...     _ = model(torch.randn(4, 2))
        >>> int(model.num_batches_tracked)
        0
    """
    saved = [
        (buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module.named_buffers(recurse=False)
        if name in _RUNNING_STATS and buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: Callable[[], Tensor],
    scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    r"""One SAM step with BatchNorm statistics updated once and the ascent gradient kept local under DDP.

    ``loss_fn()`` runs the forward pass and returns the loss (no ``backward``). The first pass (at :math:`w`)
    runs inside ``model.no_sync()`` when the model has one (Note [SAM and DDP]); the second (at
    :math:`w + \hat\epsilon`) inside :func:`sam_bn_guard`. With ``rho = 0`` there is one ordinary, synced pass
    and the step is the base optimiser's. With a ``GradScaler`` the losses are scaled and the step goes
    through ``scaler.step``; call ``scaler.update()`` afterwards.

    Args:
        model: the module ``loss_fn`` evaluates (a ``DistributedDataParallel`` wrapper, if any).
        optimizer: a :class:`SAM` over the model's parameters.
        loss_fn: the forward pass, returning a scalar loss.
        scaler: optional ``torch.amp.GradScaler``.

    Returns:
        The loss at :math:`w`, detached.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        >>> opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss = sam_step(model, opt, lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> int(model[1].num_batches_tracked)
        1
    """
    perturbs = optimizer._perturbs()
    no_sync = getattr(model, "no_sync", None)
    sync_guard = no_sync() if perturbs and callable(no_sync) else contextlib.nullcontext()
    optimizer.zero_grad()
    with torch.enable_grad():
        with sync_guard:
            loss = loss_fn()
            _backward(loss, scaler)
        if perturbs:
            optimizer.first_step(zero_grad=True, scaler=scaler)
            with sam_bn_guard(model):
                _backward(loss_fn(), scaler)
    optimizer.second_step(scaler=scaler)
    return loss.detach()
