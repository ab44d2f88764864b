"""OptNet layers: quadratic programs with learnable data whose solution is the layer's output.

Every layer here is feasible *by construction* (Amos & Kolter, ICML 2017, section 3): the
learnable data are parameterised so that some point is strictly feasible for every parameter value,
so training can never produce an empty feasible set.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optlayers.compiling import opaque_to_user_compile
from optlayers.qp.relax import Relaxation
from optlayers.qp.solve import QPSolution, solve_qp
from optlayers.validation.options import check_bool, check_int
from optlayers.validation.qp import (
    check_layer_input,
    check_optnet_options,
    check_optnet_tv_options,
    check_qp_options,
    layer_dtype,
)

DEFAULT_EPS = 1e-4
"""Added to Q = LLᵀ so that Q is positive definite (the paper's ε); small enough not to bias z."""

_SOFTPLUS_ONE = math.log(math.e - 1.0)
"""softplus⁻¹(1): initialises slacks (and z₀ of non-negative layers) at exactly 1, as the paper does."""

TV_RANDOM_D_SCALE = 0.3
"""Standard deviation of a randomly initialised differencing operator D (the paper's OptNet-learn-D)."""


def _solver_options(tol: float | None, max_iter: int | None, on_failure: str, failed_value: float,
                    relaxation: Relaxation | None, compile: bool) -> dict:
    check_qp_options(tol, None, max_iter, on_failure, failed_value, relaxation)
    check_bool("compile", compile)
    return {"tol": tol, "max_iter": max_iter, "on_failure": on_failure, "failed_value": float(failed_value),
            "relaxation": relaxation, "compile": compile}


def _record(layer: nn.Module, sol: QPSolution) -> QPSolution:
    """Keep the statuses of the last forward on the layer (not inside ``torch.func`` transforms,
    whose tensors must not escape them)."""
    if not torch._C._are_functorch_transforms_active():
        layer.last_status = sol.status.detach()
    return sol


def first_difference(n: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The (n-1, n) first-difference operator: ``(D x)_i = x_{i+1} - x_i``."""
    check_int("n", n, 2)
    eye = torch.eye(n, device=device, dtype=dtype)
    return eye[1:] - eye[:-1]


def _from_autocast(x: Tensor, layer: nn.Module) -> Tensor:
    """The layers run with ``torch.autocast`` off, in their own dtype, as autocast runs its float32
    operations (``linalg`` among them): under autocast an input of a lower precision (float16,
    bfloat16: what a layer before produced) is cast to the layer's dtype. Otherwise Q = LLᵀ + εI and
    the constraints' right-hand sides would be formed in bfloat16 (2 % off in z), or be refused."""
    if isinstance(x, Tensor) and x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        return x.to(layer_dtype(layer) or torch.get_default_dtype())
    return x


def _autocast_off(x: object) -> torch.autocast:
    """``torch.autocast`` off on the device of the input ``x`` (the CPU's where ``x`` is no tensor:
    ``check_layer_input`` refuses it inside)."""
    return torch.autocast(x.device.type if isinstance(x, Tensor) else "cpu", enabled=False)


class OptNet(nn.Module):
    r"""Solves ``z* = argmin_z ½ zᵀQz + pᵀz  s.t.  A z = b,  G z ≤ h`` for the input ``p``.

    The constraint data are learned through the paper's always-feasible parameterisation
    ``b = A z₀`` and ``h = G z₀ + s₀`` with ``s₀ = softplus(·) > 0``: the learned point ``z₀``
    is strictly feasible for every value of the parameters. ``Q = LLᵀ + εI`` with a learned lower
    triangular ``L``, or the fixed ``Q = q·I`` when ``fixed_q`` is given (the paper's Sudoku layer
    uses ``fixed_q=0.1, nonnegative=True, n_eq=40``: only ``A`` and ``z₀`` are learned).

    Args:
        n: number of QP variables (the size of ``p`` and ``z``).
        n_ineq: number of learned inequality constraints ``G z ≤ h``.
        n_eq: number of learned equality constraints ``A z = b``; must be < ``n`` (with ``n_eq = n``
            the constraints alone fix ``z = z₀``).
        eps: the ε of ``Q = LLᵀ + εI``; ignored when ``fixed_q`` is given.
        fixed_q: if given, ``Q = fixed_q·I`` is a constant (``0`` allowed: a linear program; a
            warning where its feasible set cannot be bounded, fewer than n − n_eq + 1 inequalities).
        nonnegative: add the fixed constraints ``z ≥ 0``; ``z₀`` is then kept positive (softplus).
        tol, max_iter, compile: passed to :func:`optlayers.solve_qp` (``compile=True``: its compiled
            path, docs/qp.md).
        on_failure: what happens to QPs that are not solved. "warn" (default): a warning names
            them, their output is ``failed_value`` (0.0, finite) and their gradient zero, so
            training goes on; "ignore": the same, silently; "raise": ``SolveError``; "relax":
            primal infeasible QPs (and those stopped with the primal residual above tolerance)
            hold the solution of their always-feasible elastic relaxation (``optlayers.qp.relax``,
            weights ``relaxation``) with its exact gradients, and are warned about.
            ``last_status`` holds the ``Status`` codes of the last forward.
        failed_value, relaxation: see ``on_failure``.
        device, dtype: factory kwargs for the parameters.

    Shape:
        - Input ``p``: ``(*, n)``.
        - Output ``z``: ``(*, n)``.

    Examples::

        >>> layer = OptNet(10, n_ineq=20, n_eq=2, dtype=torch.float64)
        >>> z = layer(torch.randn(32, 10, dtype=torch.float64))
        >>> z.shape
        torch.Size([32, 10])
    """

    def __init__(
        self,
        n: int,
        n_ineq: int = 0,
        n_eq: int = 0,
        *,
        eps: float = DEFAULT_EPS,
        fixed_q: float | None = None,
        nonnegative: bool = False,
        tol: float | None = None,
        max_iter: int | None = None,
        on_failure: str = "warn",
        failed_value: float = 0.0,
        relaxation: Relaxation | None = None,
        compile: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_optnet_options(n, n_ineq, n_eq, eps, fixed_q, nonnegative)
        factory = {"device": device, "dtype": dtype}
        self.n, self.n_ineq, self.n_eq = n, n_ineq, n_eq
        self.eps, self.fixed_q, self.nonnegative = eps, fixed_q, nonnegative
        self.solver_options = _solver_options(tol, max_iter, on_failure, failed_value, relaxation, compile)
        self.last_status: Tensor | None = None

        # Q is formed from parameters and constants at each call, never kept in a buffer: a buffer left out
        # of the state_dict held uninitialised memory after deferred initialisation (a module built on
        # the meta device, then to_empty and load_state_dict): z 1.5e4 off, silently.
        self.L = nn.Parameter(torch.tril(torch.rand(n, n, **factory))) if fixed_q is None else None
        self._factory = factory  # the dtype and device of a fixed Q where the layer has no parameters
        # Absent constraint blocks are registered as None so that DistributedDataParallel sees no unused parameters.
        self.G = nn.Parameter(torch.empty(n_ineq, n, **factory).uniform_(-1.0, 1.0)) if n_ineq else None
        self.s0_raw = nn.Parameter(torch.full((n_ineq,), _SOFTPLUS_ONE, **factory)) if n_ineq else None
        self.A = nn.Parameter(torch.rand(n_eq, n, **factory)) if n_eq else None
        z0_init = _SOFTPLUS_ONE if nonnegative else 0.0
        constrained = bool(n_ineq or n_eq or nonnegative)
        self.z0_raw = nn.Parameter(torch.full((n,), z0_init, **factory)) if constrained else None

    @property
    def z0(self) -> Tensor | None:
        """The strictly feasible point, shape ``(n,)``; None for an unconstrained layer."""
        if self.z0_raw is None:
            return None
        return F.softplus(self.z0_raw) if self.nonnegative else self.z0_raw

    @property
    def s0(self) -> Tensor | None:
        """The positive slack of the learned inequalities at ``z₀``, shape ``(n_ineq,)``; None if n_ineq = 0."""
        return None if self.s0_raw is None else F.softplus(self.s0_raw)

    def qp_data(self, like: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The current ``(Q, G, h, A, b)``; ``None`` for absent constraints. ``G``/``h`` include ``z ≥ 0``.
        A fixed Q takes the parameters' dtype and device, or, in a layer without parameters, ``like``'s
        (the input), or else the layer's construction's."""
        if self.fixed_q is None:
            L = torch.tril(self.L)
            Q = L @ L.T + self.eps * torch.eye(self.n, device=L.device, dtype=L.dtype)
        else:
            like = next(self.parameters(), like)
            factory = self._factory if like is None else {"device": like.device, "dtype": like.dtype}
            Q = self.fixed_q * torch.eye(self.n, **factory)
        z0 = self.z0
        G = h = A = b = None
        if self.n_ineq:
            G, h = self.G, self.G @ z0 + self.s0
        if self.nonnegative:
            eye = torch.eye(self.n, device=z0.device, dtype=z0.dtype)
            zeros = torch.zeros_like(z0)
            G = -eye if G is None else torch.cat([G, -eye])
            h = zeros if h is None else torch.cat([h, zeros])
        if self.n_eq:
            A, b = self.A, self.A @ z0
        return Q, G, h, A, b

    @opaque_to_user_compile
    def solve(self, p: Tensor):
        """The full :func:`optlayers.solve_qp` solution (``z``, duals, slacks, status) for input ``p``."""
        p = _from_autocast(p, self)
        with _autocast_off(p):
            check_layer_input("p", p, self.n, self)
            Q, G, h, A, b = self.qp_data(p)
            return _record(self, solve_qp(Q, p, G, h, A, b, **self.solver_options))

    @opaque_to_user_compile
    def forward(self, p: Tensor) -> Tensor:
        return self.solve(p).z

    def extra_repr(self) -> str:
        q = f"fixed_q={self.fixed_q}" if self.fixed_q is not None else f"eps={self.eps}"
        return f"n={self.n}, n_ineq={self.n_ineq}, n_eq={self.n_eq}, {q}, nonnegative={self.nonnegative}"


class OptNetTV(nn.Module):
    r"""Total-variation denoising as a QP layer with a (learnable) differencing operator ``D``.

    For a noisy signal ``y`` it returns ``x`` of
    ``min_{x,t} ½‖x − y‖² + λ 1ᵀt + ½ε‖t‖²  s.t.  −t ≤ D x ≤ t``, i.e. ``min ½‖x − y‖² + λ‖Dx‖₁``
    (up to ε). With ``D`` the first difference this is classical 1-D TV denoising; the paper learns
    ``D`` from ``init="random"``. Feasible by construction: ``h = 0`` and ``t = |Dx| + 1`` is strictly
    feasible for every ``x`` and ``D``.

    Args:
        n: signal length.
        lam: the weight λ > 0 of ``‖Dx‖₁``.
        n_diff: rows of ``D`` (default ``n - 1``; must be ``n - 1`` for ``init="difference"``).
        init: ``"difference"`` (classical TV) or ``"random"`` (N(0, 0.3²) entries, as in the paper).
        learn_d: whether ``D`` is an ``nn.Parameter`` (else a buffer).
        eps: the ε on ``t`` that makes the QP strictly convex.
        tol, max_iter, compile, on_failure, failed_value, relaxation: as in :class:`OptNet` (failed
            signals come out as ``failed_value``, 0.0, with zero gradient and a warning).
        device, dtype: factory kwargs.

    Shape:
        - Input ``y``: ``(*, n)``.
        - Output ``x``: ``(*, n)``.

    Examples::

        >>> tv = OptNetTV(100, lam=20.0, learn_d=False, dtype=torch.float64)
        >>> x = tv(torch.randn(8, 100, dtype=torch.float64))
    """

    def __init__(
        self,
        n: int,
        lam: float,
        *,
        n_diff: int | None = None,
        init: str = "difference",
        learn_d: bool = True,
        eps: float = DEFAULT_EPS,
        tol: float | None = None,
        max_iter: int | None = None,
        on_failure: str = "warn",
        failed_value: float = 0.0,
        relaxation: Relaxation | None = None,
        compile: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n_diff = n - 1 if n_diff is None else n_diff
        check_optnet_tv_options(n, lam, eps, n_diff, learn_d, init)
        factory = {"device": device, "dtype": dtype}
        if init == "difference":
            D = first_difference(n, **factory)
        else:
            D = TV_RANDOM_D_SCALE * torch.randn(n_diff, n, **factory)
        if learn_d:
            self.D = nn.Parameter(D)
        else:
            self.register_buffer("D", D)
        self.n, self.n_diff, self.lam, self.eps, self.init = n, n_diff, float(lam), eps, init
        self.solver_options = _solver_options(tol, max_iter, on_failure, failed_value, relaxation, compile)
        self.last_status: Tensor | None = None

    def qp_data(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q, G, h)`` over the stacked variable ``(x, t)`` of size ``n + n_diff``."""
        D = self.D
        eye_t = torch.eye(self.n_diff, device=D.device, dtype=D.dtype)
        Q = torch.block_diag(torch.eye(self.n, device=D.device, dtype=D.dtype), self.eps * eye_t)
        G = torch.cat([torch.cat([D, -eye_t], 1), torch.cat([-D, -eye_t], 1)])
        return Q, G, torch.zeros(2 * self.n_diff, device=D.device, dtype=D.dtype)

    @opaque_to_user_compile
    def forward(self, y: Tensor) -> Tensor:
        y = _from_autocast(y, self)
        with _autocast_off(y):
            check_layer_input("y", y, self.n, self)
            Q, G, h = self.qp_data()
            p = torch.cat([-y, torch.full((*y.shape[:-1], self.n_diff), self.lam, device=y.device, dtype=y.dtype)], -1)
            return _record(self, solve_qp(Q, p, G, h, **self.solver_options)).z[..., : self.n]

    def extra_repr(self) -> str:
        learn = isinstance(self.D, nn.Parameter)
        return f"n={self.n}, lam={self.lam}, n_diff={self.n_diff}, init={self.init!r}, learn_d={learn}, eps={self.eps}"
