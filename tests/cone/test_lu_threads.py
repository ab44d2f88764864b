"""The cone derivative survives torch's racing batched LU after torch.set_num_threads(2)
(pytorch/pytorch#142815), in a fresh interpreter since the race depends on process state."""
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")

_SCRIPT = """
import torch
torch.set_num_threads(2)
from optlayers.cone import ConeSpec, solve_cone
from optlayers.cone.testing import random_program
spec = ConeSpec(zero=20, nonneg=120, soc=[10, 10])
A, b, c, _, x, _, _ = random_program(spec, 60, batch=8, seed=0)
A.requires_grad_()
sol = solve_cone(A, b, c, spec, solver="ipm")
sol.x.sum().backward()
assert bool((sol.status == 0).all()), sol.status
assert float((sol.x - x).detach().abs().max()) < 1e-9
assert bool(A.grad.isfinite().all())
"""


def test_cone_layer_after_set_num_threads_two():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
