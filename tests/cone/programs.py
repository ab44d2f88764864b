"""Small cone programs with known solutions, shared by the cone tests."""
from __future__ import annotations

import torch


def two_variable_program(beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, b, c, P) of min ½‖x‖² − βx₀ + x₁ s.t. |x₁| ≤ 0.5 (two nonnegative rows): x = (β, −0.5), a small
    variable beside a large one (docs/cone.md, "A refinement that cannot start"); c requires grad."""
    P = torch.eye(2, dtype=torch.float64)
    A = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5], dtype=torch.float64)
    c = torch.tensor([-beta, 1.0], dtype=torch.float64, requires_grad=True)
    return A, b, c, P
