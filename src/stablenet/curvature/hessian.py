r"""The Hessian of a model's loss as an operator: products, top eigenvalues, trace and spectral density.

:class:`Hessian` never forms the matrix. Everything goes through Hessian-vector products computed by
automatic differentiation, averaged exactly over a data set, and the Krylov methods of
:mod:`stablenet.curvature.lanczos`.

References:
    Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994 (Hessian-vector
    products). Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990.
    Ghorbani, Krishnan and Xiao, "An investigation into neural net optimization via Hessian eigenvalue
    density", ICML 2019 (stochastic Lanczos quadrature). Yao et al., "PyHessian", 2020.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from stablenet.curvature.lanczos import (
    EigshResult,
    gaussian_density,
    lanczos_eigsh,
    power_eigsh,
    rademacher,
    stochastic_lanczos_quadrature,
)

__all__ = ["BACKENDS", "METHODS", "STARTS", "WRT", "Hessian"]

logger = logging.getLogger(__name__)

#: Accepted values of ``wrt``: the Hessian with respect to the parameters or to the inputs of one batch.
WRT = ("params", "inputs")
#: Accepted eigenvalue methods.
METHODS = ("lanczos", "power")
#: Accepted ways to compute a Hessian-vector product (see :class:`Hessian`).
BACKENDS = ("double_backward", "forward_over_reverse")
#: Accepted starting vectors of the eigensolvers (see :meth:`Hessian.eigenvalues`).
STARTS = ("gradient", "random")

_Batch = tuple[Any, Any]


def _is_batch(data: object) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized()


class Hessian:
    r"""Hessian of the mean loss of ``model`` over ``data``, as a linear operator.

    With :math:`N` examples in total, spread over batches :math:`b` of sizes :math:`n_b`, and
    ``loss_fn(model(inputs), targets)`` returning the **mean** loss :math:`\bar\ell_b` over batch
    :math:`b`, the loss is :math:`L(\theta) = \frac1N \sum_b n_b\,\bar\ell_b(\theta)` and

    .. math:: H = \nabla^2_\theta L = \frac1N \sum_b n_b\,\nabla^2_\theta \bar\ell_b,

    so every quantity is exact for the whole data set whatever the batch sizes. Products :math:`Hv`
    (Pearlmutter 1994) cost about two gradient evaluations, by either backend:

    * ``"double_backward"``: :math:`Hv = \nabla_\theta(\nabla_\theta L \cdot v)`, reverse over reverse
      (``torch.autograd.grad`` with ``create_graph=True``);
    * ``"forward_over_reverse"``: :math:`Hv = \frac{d}{dt}\nabla_\theta L(\theta + t v)|_{t=0}`,
      ``torch.func.jvp`` of ``torch.func.grad`` through ``torch.func.functional_call``. It needs every
      parameter to belong to ``model``.

    With ``wrt="inputs"`` the variable is the input tensor :math:`x` of a single batch and
    :math:`H = \nabla_x^2 \bar\ell(x)`, the Hessian of the batch-mean loss with respect to the whole input
    tensor (``x.numel()`` square). For a model without cross-example interaction (eval mode) it is block
    diagonal, block :math:`i` being :math:`\frac1n \nabla^2_{x_i} \ell_i`.

    Mode. By default the model is evaluated in eval mode (BatchNorm running statistics, no dropout), and
    each module's own mode is restored after every call. With ``train_mode=True`` it runs in train mode
    without touching the BatchNorm running statistics (Note [batch statistics in train mode]) and with the
    same dropout masks for every product (Note [fixed dropout masks]), so that the operator stays fixed.

    Distributed. If ``torch.distributed`` is initialised, each rank holds its own ``data``; products and
    gradients are all-reduced and weighted by each rank's number of examples, so that :math:`H` is that of
    the union of all ranks' data. Random vectors are drawn identically on every rank (a seed is broadcast
    from rank 0 when no ``generator`` is given). A ``DistributedDataParallel`` wrapper is unwrapped. With
    ``wrt="inputs"`` nothing is reduced: each rank has the Hessian of its own batch.

    Args:
        model: the network.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean as a scalar.
        data: one ``(inputs, targets)`` batch, or a re-iterable of batches (a list, a ``DataLoader``). Tensors
            are moved to the parameters' device.
        params: ``None`` (every parameter with ``requires_grad``), a list of parameters, or a dict
            ``name -> list of parameters`` whose groups give the ``per_group`` results. With ``None`` the
            groups are the layers: the parameters of each module, by module name; a list is one group,
            ``"params"``.
        wrt: one of :data:`WRT`.
        train_mode: evaluate the model in train mode.
        backend: one of :data:`BACKENDS`; default ``"double_backward"`` (faster on CPU in our measurements,
            and it supports parameters outside ``model``).
        cache_graph: with a single batch and ``"double_backward"``, keep the gradient's graph during one
            :meth:`eigenvalues`, :meth:`trace` or :meth:`density` call, so each product after the first is one
            backward pass (Note [graph reuse]; the memory of one forward-backward graph is held meanwhile).

    Attributes:
        last_num_hvp: Hessian-vector products used by the last public call.
        num_hvp: Hessian-vector products used since construction.
        last_result: the :class:`~stablenet.curvature.lanczos.EigshResult` of the last :meth:`eigenvalues`
            call (a dict of them with ``per_group=True``).
        last_quadrature: ``(nodes, weights)`` of the last :meth:`density` call.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> h = Hessian(net, nn.functional.cross_entropy, (x, y))
        >>> values, vectors = h.eigenvalues(k=2, tol=1e-8)
        >>> bool(values[0] >= values[1])
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        data: _Batch | Iterable[_Batch],
        params: Sequence[Tensor] | dict[str, Sequence[Tensor]] | None = None,
        wrt: str = "params",
        *,
        train_mode: bool = False,
        backend: str = "double_backward",
        cache_graph: bool = True,
    ) -> None:
        if wrt not in WRT:
            raise ValueError(f"wrt must be one of {', '.join(map(repr, WRT))}; got {wrt!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
        if isinstance(model, DistributedDataParallel):
            # Its forward prepares a gradient reduction that autograd.grad never runs; we all-reduce ourselves.
            model = model.module
        self.model = model
        self.loss_fn = loss_fn
        self.wrt = wrt
        self.train_mode = bool(train_mode)
        self.backend = backend
        self.cache_graph = bool(cache_graph)
        self._graph_cache: dict | None = None
        self.num_hvp = 0
        self.last_num_hvp = 0
        self.last_result: EigshResult | dict[str, EigshResult] | None = None
        self.last_quadrature: tuple[Tensor, Tensor] | None = None
        self._seed = int(torch.randint(0, 2**62, (1,)).item()) if train_mode else 0
        self._batches = self._check_data(data)
        self._names = {id(p): name for name, p in model.named_parameters()}
        if wrt == "inputs":
            if params is not None:
                raise ValueError("params must be None when wrt='inputs'")
            batches = list(self._batches)
            if len(batches) != 1:
                raise ValueError(f"wrt='inputs' needs a single (inputs, targets) batch; got {len(batches)} batches")
            inputs = batches[0][0]
            if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
                raise ValueError("wrt='inputs' needs a floating-point inputs tensor")
            self._batches = batches
            self._groups: dict[str, list[Tensor]] | None = None
            self._space = [inputs.detach()]
        else:
            self._groups = self._check_params(model, params)
            self._space = [p for group in self._groups.values() for p in group]
            if backend == "forward_over_reverse" and any(id(p) not in self._names for p in self._space):
                raise ValueError("backend='forward_over_reverse' needs every parameter to belong to model")
        self._device = self._space[0].device
        self._dtype = self._space[0].dtype

    # ----------------------------------------------------------------------------------------------
    # Validation

    @staticmethod
    def _check_data(data: object) -> Iterable[_Batch]:
        if _is_batch(data):
            return [tuple(data)]
        if isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise ValueError(
                f"data must be an (inputs, targets) batch or a re-iterable of batches; got {type(data).__name__}"
            )
        if iter(data) is data:
            raise ValueError("data must be re-iterable (a list or a DataLoader); got a one-shot iterator")
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("data must hold at least one (inputs, targets) batch; got an empty iterable")
        return data

    @staticmethod
    def _check_params(model: nn.Module, params: object) -> dict[str, list[Tensor]]:
        if params is None:
            groups: dict[str, list[Tensor]] = {}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    groups.setdefault(name.rpartition(".")[0] or name, []).append(p)
            if not groups:
                raise ValueError("model has no trainable parameters (requires_grad=True); pass params explicitly")
        elif isinstance(params, dict):
            groups = {str(k): [v] if isinstance(v, Tensor) else list(v) for k, v in params.items()}
        elif isinstance(params, Iterable) and not isinstance(params, Tensor):
            groups = {"params": list(params)}
        else:
            raise ValueError(
                f"params must be None, a list of parameters or a dict of lists; got {type(params).__name__}"
            )
        seen: set[int] = set()
        for name, group in groups.items():
            if not group:
                raise ValueError(f"parameter group {name!r} is empty; every group needs at least one parameter")
            for p in group:
                if not isinstance(p, Tensor) or not p.is_floating_point() or not p.requires_grad:
                    raise ValueError("params must be floating-point tensors with requires_grad=True")
                if id(p) in seen:
                    raise ValueError(f"a parameter appears twice (group {name!r}); groups must be disjoint")
                seen.add(id(p))
        return groups

    @property
    def dim(self) -> int:
        """Dimension of the operator: the number of parameters (or of input entries)."""
        return sum(t.numel() for t in self._space)

    @property
    def groups(self) -> dict[str, list[Tensor]]:
        """The parameter groups used by ``per_group=True``."""
        if self._groups is None:
            raise ValueError("per-group results need wrt='params'")
        return self._groups

    # ----------------------------------------------------------------------------------------------
    # Evaluation

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        untracked = []
        try:
            self.model.train(self.train_mode)
            if self.train_mode:
                # Note [batch statistics in train mode]: in train mode BatchNorm normalises by the batch
                # statistics and, if it tracks them, also updates its running buffers in place at every
                # forward. Clearing track_running_stats keeps the first and skips the second, so computing
                # the Hessian leaves the model unchanged.
                for m in self.model.modules():
                    if isinstance(m, _BatchNorm) and m.track_running_stats:
                        m.track_running_stats = False
                        untracked.append(m)
            with torch.enable_grad():
                yield
        finally:
            for m, training in modes:
                m.training = training
            for m in untracked:
                m.track_running_stats = True

    def _rng(self, index: int) -> contextlib.AbstractContextManager:
        if not self.train_mode:
            return contextlib.nullcontext()
        # Note [fixed dropout masks]: a product must apply the same operator every time, so in train mode
        # batch i always runs from the same random state (and the caller's random state is left as it was).
        devices = sorted({t.device.index or 0 for t in self._space if t.device.type == "cuda"})
        stack = contextlib.ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=devices))
        torch.default_generator.manual_seed(self._seed + index)
        for device in devices:
            torch.cuda.default_generators[device].manual_seed(self._seed + index)
        return stack

    def _loss(self, inputs: Any, targets: Any) -> Tensor:
        loss = self.loss_fn(self.model(inputs), targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor (the batch mean)")
        return loss

    def _unpack(self, batch: object) -> tuple[Any, Any, int]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"each batch must be an (inputs, targets) pair; got {type(batch).__name__}")
        inputs, targets = (t.to(self._device) if isinstance(t, Tensor) else t for t in batch)
        n = inputs.shape[0] if isinstance(inputs, Tensor) and inputs.dim() > 0 else len(targets)
        return inputs, targets, int(n)

    def _mean_over_data(self, fn: Callable[[Any, Any], Tensor]) -> Tensor:
        """``(1/N) sum_b n_b fn(batch b)`` over all batches (and all ranks), ``fn`` returning a flat tensor."""
        total: Tensor | None = None
        count = 0
        with self._evaluation():
            for index, batch in enumerate(self._batches):
                inputs, targets, n = self._unpack(batch)
                with self._rng(index):
                    value = fn(inputs, targets) * n
                total = value if total is None else total + value
                count += n
        if total is None or count == 0:
            raise ValueError("data must hold at least one (inputs, targets) batch; got none")
        if _ddp() and self.wrt == "params":
            dist.all_reduce(total)
            counts = torch.tensor([count], dtype=torch.int64, device=total.device)
            dist.all_reduce(counts)
            count = int(counts.item())
        return total / count

    def _variables(self, params: Sequence[Tensor], inputs: Tensor) -> list[Tensor]:
        if self.wrt == "inputs":
            return [inputs.detach().requires_grad_(True)]
        return list(params)

    def _batch_grad(self, params: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        if self._graph_cache is not None:  # inside a solve: the products will need this graph anyway
            variables, grads = self._graph(params, inputs, targets)
        else:
            variables = self._variables(params, inputs)
            if self.wrt == "inputs":
                inputs = variables[0]
            grads = torch.autograd.grad(self._loss(inputs, targets), variables, allow_unused=True)
        return _flatten(
            [torch.zeros_like(v) if g is None else g.detach() for g, v in zip(grads, variables, strict=True)]
        )

    @contextlib.contextmanager
    def _cached_graphs(self) -> Iterator[None]:
        """Keep the first-order graph of a single batch across the products of one solve (Note [graph reuse])."""
        single = isinstance(self._batches, list) and len(self._batches) == 1
        self._graph_cache = {} if (single and self.cache_graph and self.backend == "double_backward") else None
        try:
            yield
        finally:
            self._graph_cache = None

    def _graph(self, params: Sequence[Tensor], inputs: Any, targets: Any) -> tuple[list[Tensor], tuple]:
        """The variables and the gradient with its graph (``create_graph``), from the cache when it holds them."""
        # Note [graph reuse]: H v = d/dθ <∇L(θ), v> differentiates the gradient's graph, which does not depend on v.
        # Within one eigensolve, trace or density on a single batch (self._graph_cache set), the gradient and its
        # graph are built once and kept (retain_graph); each further product is one backward pass through it.
        cache = self._graph_cache
        key = tuple(id(p) for p in params)
        if cache is not None and key in cache:
            return cache[key]
        variables = self._variables(params, inputs)
        if self.wrt == "inputs":
            inputs = variables[0]
        grads = torch.autograd.grad(self._loss(inputs, targets), variables, create_graph=True, allow_unused=True)
        if cache is not None:
            cache[key] = (variables, grads)
        return variables, grads

    def _batch_hvp(self, params: Sequence[Tensor], vs: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        if self.backend == "forward_over_reverse":
            return self._batch_hvp_func(params, vs, inputs, targets)
        cache = self._graph_cache
        variables, grads = self._graph(params, inputs, targets)
        pairs = [(g, v) for g, v in zip(grads, vs, strict=True) if g is not None and g.requires_grad]
        if not pairs:  # the gradient does not depend on the variables: H = 0
            return torch.zeros(sum(v.numel() for v in variables), dtype=self._dtype, device=self._device)
        # H v = d/dθ <g, v>: one vector-Jacobian product of the gradient with v, without building <g, v> itself.
        outputs, grad_outputs = zip(*pairs, strict=True)
        hv = torch.autograd.grad(
            outputs, variables, grad_outputs=grad_outputs, allow_unused=True, retain_graph=cache is not None
        )
        return _flatten([torch.zeros_like(v) if h is None else h for h, v in zip(hv, variables, strict=True)])

    def _batch_hvp_func(self, params: Sequence[Tensor], vs: Sequence[Tensor], inputs: Any, targets: Any) -> Tensor:
        if self.wrt == "inputs":

            def loss_of(variables: tuple[Tensor, ...]) -> Tensor:
                return self._loss(variables[0], targets)

            primals = (inputs.detach(),)
        else:
            names = [self._names[id(p)] for p in params]

            def loss_of(variables: tuple[Tensor, ...]) -> Tensor:
                outputs = torch.func.functional_call(self.model, dict(zip(names, variables, strict=True)), (inputs,))
                loss = self.loss_fn(outputs, targets)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor (the batch mean)")
                return loss

            primals = tuple(p.detach() for p in params)
        _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (tuple(vs),))
        return _flatten(hv)

    def _hvp_flat(self, params: Sequence[Tensor], flat: Tensor) -> Tensor:
        vs = _unflatten(flat.detach().to(dtype=self._dtype, device=self._device), params)
        self.num_hvp += 1
        return self._mean_over_data(lambda inputs, targets: self._batch_hvp(params, vs, inputs, targets))

    def _matvec(self, params: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda q: self._hvp_flat(params, q)

    def _as_flat(self, v: Tensor | Sequence[Tensor], like: Sequence[Tensor]) -> Tensor:
        dim = sum(t.numel() for t in like)
        if isinstance(v, Tensor):
            if v.numel() != dim or (v.dim() != 1 and (len(like) != 1 or v.shape != like[0].shape)):
                shapes = [tuple(t.shape) for t in like]
                raise ValueError(
                    f"v must be a flat vector of {dim} entries or tensors shaped {shapes}; got {tuple(v.shape)}"
                )
            return v.reshape(-1)
        v = list(v)
        if len(v) != len(like) or any(a.shape != b.shape for a, b in zip(v, like, strict=True)):
            shapes = [tuple(t.shape) for t in like]
            raise ValueError(
                f"v must be a flat vector of {dim} entries or tensors shaped {shapes}; got {len(v)} tensors"
            )
        return _flatten(v)

    def _generator(self, generator: torch.Generator | None) -> torch.Generator | None:
        if generator is not None or not _ddp():
            return generator
        # Every rank must draw the same random vectors, or the ranks would run different iterations.
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(self._device)
        dist.broadcast(seed, src=0)
        return torch.Generator().manual_seed(int(seed.item()))

    def _spaces(self, per_group: bool) -> dict[str, list[Tensor]]:
        return self.groups if per_group else {"all": self._space}

    def _start_vector(self, space: Sequence[Tensor], start: str, generator: torch.Generator | None) -> Tensor:
        r"""An eigensolver's starting vector: random, or the unit gradient plus a unit random vector.

        Note [gradient start]: the gradient of a network's loss lies mostly in the span of the Hessian's top
        eigenvectors (Gur-Ari, Roberts and Dyer, "Gradient descent happens in a tiny subspace", 2018), while a
        random vector in :math:`n` dimensions has a component of only about :math:`1/\sqrt n` along any of
        them: Krylov methods started from the gradient reach the top eigenvalues in fewer products. The random
        half keeps a component along every eigenvector (with probability 1), so no eigenvalue is hidden from
        the solver even where the gradient is orthogonal to it; a zero or non-finite gradient leaves the
        random vector alone. Inside a solve on one batch the gradient comes from the graph the products reuse
        (Note [graph reuse]), at no extra cost; otherwise it costs one gradient.
        """
        dim = sum(t.numel() for t in space)
        r = torch.randn(dim, generator=generator, dtype=torch.float64).to(self._device)
        if start == "random":
            return r
        g = self._mean_over_data(lambda inputs, targets: self._batch_grad(space, inputs, targets)).to(torch.float64)
        norm = g.norm()
        if not torch.isfinite(norm) or norm == 0:
            return r
        return g / norm + r / r.norm()

    # ----------------------------------------------------------------------------------------------
    # Public API

    def gradient(self) -> list[Tensor] | Tensor:
        r"""The gradient :math:`\nabla L` of the mean loss: a list shaped like the parameters (the inputs
        tensor with ``wrt="inputs"``), all-reduced over ranks."""
        flat = self._mean_over_data(lambda inputs, targets: self._batch_grad(self._space, inputs, targets))
        out = _unflatten(flat, self._space)
        return out[0] if self.wrt == "inputs" else out

    def hvp(self, v: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        r"""The Hessian-vector product :math:`Hv`.

        Args:
            v: a list of tensors shaped like the parameters (with ``wrt="inputs"``: a tensor shaped like the
                inputs), or a flat vector of :attr:`dim` entries in the same order.

        Returns:
            :math:`Hv` in the same form as ``v``, in the parameters' dtype and on their device.
        """
        flat = self._as_flat(v, self._space)
        out = self._hvp_flat(self._space, flat)
        self.last_num_hvp = 1
        if isinstance(v, Tensor):
            return out.view(v.shape)
        return _unflatten(out, self._space)

    def eigenvalues(
        self,
        k: int = 1,
        method: str = "lanczos",
        max_iter: int = 100,
        tol: float = 1e-3,
        generator: torch.Generator | None = None,
        *,
        per_group: bool = False,
        start: str = "gradient",
    ) -> tuple[Tensor, list] | dict[str, tuple[Tensor, list]]:
        r"""The :math:`k` largest (algebraic) eigenvalues of :math:`H` and their eigenvectors.

        ``"lanczos"`` (:func:`~stablenet.curvature.lanczos.lanczos_eigsh`) stops when the top-:math:`k` Ritz
        values change by less than ``tol`` (relative) in one step, after at most ``max_iter`` products.
        ``"power"`` (:func:`~stablenet.curvature.lanczos.power_eigsh`) is power iteration with deflation,
        at most ``max_iter`` products per eigenpair. The products used are in :attr:`last_num_hvp`, the
        convergence report in :attr:`last_result`.

        Both start from the normalised gradient plus a normalised random vector (``start="gradient"``,
        Note [gradient start]), which reaches a given ``tol`` in fewer products than a random start (4 against
        6 for a briefly trained MNIST CNN at ``tol = 1e-3``, ``stablenet bench curvature --data mnist``), or from a
        Gaussian random vector (``start="random"``, PyHessian's choice).

        Args:
            k: number of eigenpairs.
            method: one of :data:`METHODS`.
            max_iter, tol: stopping rule (see above).
            generator: random generator for the starting vectors.
            per_group: one result per parameter group, each for the diagonal block :math:`H_{gg}`.
            start: one of :data:`STARTS` (see above).

        Returns:
            ``(eigenvalues, eigenvectors)``: float64 ``(k,)`` descending on the parameters' device, and a
            list of ``k`` unit eigenvectors, each a list of tensors shaped like the parameters (of the group;
            an inputs-shaped tensor with ``wrt="inputs"``). A dict of these with ``per_group=True``.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(map(repr, STARTS))}; got {start!r}")
        solver = lanczos_eigsh if method == "lanczos" else power_eigsh
        generator = self._generator(generator)
        first = self.num_hvp
        results: dict[str, tuple[Tensor, list]] = {}
        reports: dict[str, EigshResult] = {}
        for name, space in self._spaces(per_group).items():
            dim = sum(t.numel() for t in space)
            with self._cached_graphs():
                v0 = self._start_vector(space, start, generator)
                result = solver(self._matvec(space), dim, k, max_iter=max_iter, tol=tol, v0=v0, generator=generator)
            vectors = [_unflatten(x.to(self._dtype), space) for x in result.eigenvectors]
            if self.wrt == "inputs":
                vectors = [x[0] for x in vectors]
            results[name] = (result.eigenvalues, vectors)
            reports[name] = result
            if not result.converged:
                logger.info("%s did not converge in %d products (group %s)", method, result.num_matvec, name)
        self.last_num_hvp = self.num_hvp - first
        self.last_result = reports if per_group else reports["all"]
        return results if per_group else results["all"]

    def trace(
        self, num_samples: int = 100, generator: torch.Generator | None = None, *, per_group: bool = False
    ) -> tuple[float, float] | dict[str, tuple[float, float]]:
        r"""Hutchinson's estimate of :math:`\operatorname{tr} H` and its standard error.

        With :math:`m` Rademacher vectors :math:`z_j` (independent :math:`\pm1` entries,
        :math:`\mathbb E[zz^\top] = I`):

        .. math:: \widehat{\operatorname{tr}} = \frac1m \sum_j z_j^\top H z_j,\qquad
            \mathrm{se} = \frac{s}{\sqrt m},

        :math:`s` being the sample standard deviation of the :math:`z_j^\top H z_j`. The estimate is
        unbiased, with variance :math:`2(\|H\|_F^2 - \sum_i H_{ii}^2)/m` (Hutchinson 1990).

        Args:
            num_samples: :math:`m \ge 2`, one product each (per group).
            generator: random generator for the :math:`z_j` (drawn on the CPU, then moved).
            per_group: one estimate per parameter group, of :math:`\operatorname{tr} H_{gg}`.

        Returns:
            ``(estimate, standard_error)`` as floats, or a dict of them with ``per_group=True``.
        """
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to give a standard error; got {num_samples}")
        generator = self._generator(generator)
        first = self.num_hvp
        results = {}
        for name, space in self._spaces(per_group).items():
            dim = sum(t.numel() for t in space)
            samples = torch.empty(num_samples, dtype=torch.float64)
            with self._cached_graphs():
                for j in range(num_samples):
                    z = rademacher(dim, generator=generator, device=self._device)
                    samples[j] = torch.dot(z, self._hvp_flat(space, z).to(torch.float64)).item()
            results[name] = (samples.mean().item(), (samples.std() / math.sqrt(num_samples)).item())
        self.last_num_hvp = self.num_hvp - first
        return results if per_group else results["all"]

    def density(
        self,
        num_runs: int = 10,
        num_steps: int = 50,
        grid: Tensor | None = None,
        sigma: float | None = None,
        *,
        num_points: int = 1000,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Spectral density of :math:`H` by stochastic Lanczos quadrature (Ghorbani et al., ICML 2019).

        ``num_runs`` Lanczos runs of ``num_steps`` steps from Rademacher vectors give Ritz values
        :math:`\theta_i^{(r)}` and weights :math:`\tau_i^{(r)}`
        (:func:`~stablenet.curvature.lanczos.stochastic_lanczos_quadrature`, kept in
        :attr:`last_quadrature`), smoothed by a Gaussian of width :math:`\sigma`
        (:func:`~stablenet.curvature.lanczos.gaussian_density`):

        .. math:: \hat\phi(t) = \frac1R \sum_{r,i} \tau_i^{(r)}\,\mathcal N(t;\ \theta_i^{(r)}, \sigma^2),

        an estimate of :math:`\frac1n\sum_i \delta(t - \lambda_i)`: it integrates to 1 and its mean is an
        unbiased estimate of :math:`\operatorname{tr}(H)/n`.

        Args:
            num_runs: number of runs :math:`R`.
            num_steps: Lanczos steps per run (at most :attr:`dim`), one product each.
            grid: points where the density is evaluated (default: ``num_points`` points from 5 sigma below
                the smallest Ritz value to 5 sigma above the largest, over which it integrates to ~1).
            sigma: kernel width (default: 1% of the range of the Ritz values, or of their largest magnitude if
                that is larger).
            num_points: size of the default grid.
            generator: random generator for the starting vectors.

        Returns:
            ``(grid, density)``: float64 tensors of the same shape, on the parameters' device.
        """
        generator = self._generator(generator)
        first = self.num_hvp
        with self._cached_graphs():
            nodes, weights = stochastic_lanczos_quadrature(
                self._matvec(self._space), self.dim, num_runs, num_steps, generator=generator, device=self._device
            )
        self.last_num_hvp = self.num_hvp - first
        self.last_quadrature = (nodes, weights)
        support = nodes[weights > 0]
        lo, hi = support.min().item(), support.max().item()
        if sigma is None:
            sigma = 0.01 * max(hi - lo, abs(lo), abs(hi), 1e-12)
        if grid is None:
            grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64, device=self._device)
        return grid, gaussian_density(nodes, weights, grid, sigma)
