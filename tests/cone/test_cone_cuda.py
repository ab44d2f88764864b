"""The dense derivative path on CUDA agrees with the CPU (skipped without a GPU)."""
import pytest
import torch

from optlayers import solve_cone
from optlayers.cone.testing import ALL_CONES, random_program

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_matches_cpu():
    A, b, c, P, *_ = random_program(ALL_CONES, 15, batch=4, quadratic=True, seed=30)
    grads = {}
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device).requires_grad_() for t in (A, b, c, P)]  # fresh leaves on each device
        A_, b_, c_, P_ = leaves
        sol = solve_cone(A_, b_, c_, ALL_CONES, P_)
        assert sol.x.device.type == device
        (sol.x.sum() + sol.y.square().sum()).backward()
        grads[device] = [t.grad.cpu() for t in leaves]
    for g_cpu, g_cuda in zip(grads["cpu"], grads["cuda"]):
        assert torch.allclose(g_cpu, g_cuda, atol=1e-8)
