"""Every bad input raises a message naming the argument, the expected shape and what was given."""
import pytest
import torch

from optlayers import QPFunction, solve_qp


def good():
    return dict(Q=torch.eye(3), p=torch.ones(3), G=torch.eye(3), h=torch.ones(3), A=torch.ones(1, 3), b=torch.ones(1))


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda: dict(Q=torch.eye(4)), ValueError, r"Q must have shape \(\.\.\., 3, 3\) .* got \(4, 4\)"),
        (lambda: dict(Q=torch.ones(3)), ValueError, r"Q must have shape"),
        (lambda: dict(p=torch.ones(0)), ValueError, r"p must have shape \(\.\.\., n\) with n >= 1"),
        (lambda: dict(G=torch.ones(2, 4)), ValueError, r"G must have shape \(\.\.\., k, 3\) .* got \(2, 4\)"),
        (lambda: dict(h=torch.ones(2)), ValueError, r"h must have shape \(\.\.\., 3\) to match G of shape \(3, 3\), got \(2,\)"),
        (lambda: dict(b=torch.ones(2)), ValueError, r"b must have shape \(\.\.\., 1\)"),
        (lambda: dict(h=None), ValueError, r"G was given without h"),
        (lambda: dict(A=None), ValueError, r"b was given without A"),
        (lambda: dict(Q=torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), ValueError, r"Q must be symmetric"),
        (lambda: dict(p=torch.tensor([1.0, float("nan"), 0.0])), ValueError, r"p contains NaN or Inf"),
        (lambda: dict(h=torch.tensor([1.0, float("inf"), 0.0])), ValueError, r"h contains NaN or Inf"),
        (lambda: dict(Q=torch.eye(3, dtype=torch.int64)), TypeError, r"Q must be float32 or float64, got torch.int64"),
        (lambda: dict(G=torch.eye(3, dtype=torch.float32)), TypeError, r"G has dtype torch.float32 but p has dtype torch.float64"),
        (lambda: dict(Q=[[1.0]]), TypeError, r"Q must be a torch.Tensor, got list"),
        (lambda: dict(p=torch.ones(2, 3), h=torch.ones(4, 3)), ValueError, r"batch dimensions .* do not broadcast .*p: \(2,\).*h: \(4,\)"),
        (lambda: dict(Q=torch.eye(3).to_sparse()), TypeError, r"Q must be a dense tensor"),
    ],
)
def test_bad_data(change, error, pattern):
    with pytest.raises(error, match=pattern):
        solve_qp(**{**good(), **change()})


@pytest.mark.parametrize(
    "options, pattern",
    [
        (dict(tol=-1.0), r"tol must be a non-negative number"),
        (dict(tol=0.0, rel_tol=0.0), r"tol and rel_tol cannot both be 0"),
        (dict(max_iter=0), r"max_iter must be a positive integer"),
        (dict(max_iter=2.5), r"max_iter must be a positive integer"),
        (dict(on_failure="explode"), r"on_failure must be one of \('raise', 'warn', 'ignore'\), got 'explode'"),
    ],
)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        solve_qp(**good(), **options)


def test_qpfunction_validates_options_at_construction():
    with pytest.raises(ValueError, match=r"on_failure must be one of"):
        QPFunction(on_failure="nope")
