"""Newton refinement of a solver's solution on the normalized residual map (Busseti et al. 2019).

Interior point solutions on the boundary of a curved cone are accurate only to about the square
root of the solver's tolerance. With w = y - s, the residual
R(x, w) = (P x + A^T Pi_K*(w) + c,  -A x + b - Pi_K*(w) + w) has the derivative M of
embedding.py, so a few Newton steps recover near machine accuracy; a step is kept per element
only if it lowers ||R||. y = Pi_K*(w) and s = y - w stay exactly in K*, K and complementary.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.cone import embedding, product
from optlayers.cone.derivative import Point, solve_system

REFINE_STEPS = 2  # Newton converges quadratically from a 1e-4..1e-8 accurate start: two steps suffice


def residual(point: Point, b: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """R(x, w), (B, n + m)."""
    y = product.project(point.spec, w, dual=True)
    px = torch.zeros_like(point.x) if point.P is None else embedding.matvec(point.P, point.x)
    return torch.cat([px + embedding.rmatvec(point.A, y) + c, -embedding.matvec(point.A, point.x) + b - y + w], -1)


def refine(point: Point, b: torch.Tensor, c: torch.Tensor, mode: str, steps: int = REFINE_STEPS) -> Point:
    """``point`` after up to ``steps`` Newton steps on R (failed elements untouched)."""
    if steps == 0 or not bool(point.ok.any()):
        return point
    current = point.cleaned()
    n = point.x.shape[-1]
    w = current.y - current.s
    res = residual(current, b, c, w)
    for _ in range(steps):
        step = solve_system(current, res, transpose=False, mode=mode, check=False)
        trial = dataclasses.replace(current, x=current.x - step[:, :n])
        w_trial = w - step[:, n:]
        res_trial = residual(trial, b, c, w_trial)
        better = (current.ok & (res_trial.norm(dim=-1) < res.norm(dim=-1))).unsqueeze(-1)
        y = product.project(point.spec, torch.where(better, w_trial, w), dual=True)
        w = torch.where(better, w_trial, w)
        current = dataclasses.replace(current, x=torch.where(better, trial.x, current.x), y=y, s=y - w)
        res = torch.where(better, res_trial, res)
    keep = point.ok.unsqueeze(-1)
    return dataclasses.replace(point, x=torch.where(keep, current.x, point.x),
                               y=torch.where(keep, current.y, point.y), s=torch.where(keep, current.s, point.s))
