"""``optlayers.linalg.symmetric_eigenvalues``: eigvalsh's values, and under compilation the
eigenvalue operator asked for the values alone."""
from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd

from optlayers import linalg


def _symmetric(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, dtype=torch.float64, generator=gen)
    return a + a.mT


def test_eager_values_are_eigvalsh():
    a = _symmetric(2, 5, 4, 4)
    assert torch.equal(linalg.symmetric_eigenvalues(a), torch.linalg.eigvalsh(a))


def test_compiled_values_skip_the_vectors():
    """The traced graph calls ``_linalg_eigh`` with ``compute_v`` False (``eigvalsh`` traced asks for
    the vectors, see the function's docstring), and gives eigvalsh's values to rounding; the
    ascending order holds (the step lengths read the first)."""
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm

    a = _symmetric(3, 6, 4, 4, seed=1)
    traced = torch.compile(lambda m: linalg.symmetric_eigenvalues(m) * 2, fullgraph=True,
                           backend=aot_autograd(fw_compiler=capture))
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = traced(a)
    finally:
        torch._dynamo.reset()
    calls = [node for gm in graphs for node in gm.graph.nodes if node.target is torch.ops.aten._linalg_eigh.default]
    assert len(calls) == 1
    node = calls[0]
    compute_v = node.kwargs.get("compute_v", node.args[2] if len(node.args) > 2 else True)
    assert compute_v is False
    expected = 2 * torch.linalg.eigvalsh(a)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    assert bool((got[..., 1:] >= got[..., :-1]).all())
