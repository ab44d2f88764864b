"""The CUDA path computes what the CPU path computes (skipped without a GPU)."""
import numpy as np
import pytest
import torch

from optlayers import QPStatus, solve_qp
from optlayers.qp import forward
from qp_problems import box_qp, random_qp

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_forward_and_backward(dtype):
    data = random_qp((16,), 20, 25, 3, active=True, dtype=dtype)
    results = {}
    for device in ("cpu", "cuda"):
        inputs = {k: v.to(device).clone().requires_grad_() for k, v in data.items()}
        sol = solve_qp(**inputs)
        assert sol.z.device.type == device and sol.z.dtype == dtype
        assert (sol.status == QPStatus.SOLVED).all()
        (sol.z.square().sum() + sol.lam.sum()).backward()
        results[device] = [sol.z.detach().cpu()] + [inputs[k].grad.cpu() for k in ("Q", "p", "G", "h", "A", "b")]
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        np.testing.assert_allclose(cuda.double().numpy(), cpu.double().numpy(), atol=atol, rtol=atol)


def test_cuda_mixed_devices_is_an_error():
    data = random_qp((2,), 4, 3, 0)
    with pytest.raises(ValueError, match=r"Q is on cuda:0 but p is on cpu"):
        solve_qp(data["Q"].cuda(), data["p"], data["G"], data["h"])


def test_cuda_diagonal_h_path_matches_cpu():
    """Bounds with a diagonal Q at n = DIAGONAL_MIN_N_ACCELERATOR: CUDA takes the diagonal-H path
    (recognised with one synchronisation) and agrees with the CPU."""
    data = box_qp(4, forward.DIAGONAL_MIN_N_ACCELERATOR, 5)
    results = {}
    for device in ("cpu", "cuda"):
        inputs = {k: v.to(device).clone().requires_grad_() for k, v in data.items()}
        sol = solve_qp(**inputs)
        assert (sol.status == QPStatus.SOLVED).all()
        (sol.z.square().sum() + sol.lam.sum()).backward()
        results[device] = [sol.z.detach().cpu()] + [inputs[k].grad.cpu() for k in ("Q", "p", "G", "h", "A", "b")]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        np.testing.assert_allclose(cuda.numpy(), cpu.numpy(), atol=1e-8, rtol=1e-7)
