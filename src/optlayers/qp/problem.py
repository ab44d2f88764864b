"""User QP data, checked (``validation.qp``), broadcast into one flat batch."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optlayers.engine.step import QPData
from optlayers.sides import without_absent
from optlayers.validation.qp import check_qp_data


def prepare_qp(
    Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor | None, A: Tensor | None, b: Tensor | None
) -> tuple[tuple[Tensor, ...], torch.Size]:
    """Check QP data (``validation.qp.check_qp_data``) and broadcast it to one flat batch.

    Returns:
        (Q, p, G, h, A, b) of shapes (B, n, n), (B, n), (B, k, n), (B, k), (B, m, n), (B, m), where
        absent constraints have k = 0 or m = 0, and the broadcast batch shape (B = its product,
        or 1 for unbatched data).
    """
    Q, p, G, h, A, b = check_qp_data(Q, p, G, h, A, b)
    n = p.shape[-1]
    data = {"Q": (Q, 2), "p": (p, 1), "G": (G, 2), "h": (h, 1), "A": (A, 2), "b": (b, 1)}
    parts = {name: () if t is None else t.shape[: t.dim() - tail] for name, (t, tail) in data.items()}
    given = {shape for shape in parts.values() if shape}  # () broadcasts to any batch shape
    try:
        batch = given.pop() if len(given) == 1 else torch.broadcast_shapes(*parts.values())  # one shape: itself
    except RuntimeError:
        listed = ", ".join(f"{k}: {tuple(v)}" for k, v in parts.items())
        raise ValueError(f"the batch dimensions of the QP data do not broadcast together ({listed})") from None
    size = math.prod(batch)
    flat = tuple(
        p.new_zeros(size, *((0, n) if tail == 2 else (0,))) if t is None  # an absent pair: empty, made once
        else t if len(batch) == 1 and t.shape[:-tail] == batch  # already (B, ·)
        else t.expand(*batch, *t.shape[t.dim() - tail :]).reshape(size, *t.shape[t.dim() - tail :])
        for t, tail in data.values()
    )
    return flat, batch


def qp_data(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> QPData:
    """Flat tensors to ``QPData``, with Q symmetrised."""
    return QPData(Q=0.5 * (Q + Q.transpose(-1, -2)), p=p, A=A, b=b, G=G, h=h)


def without_absent_sides(flat: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], Tensor]:
    """The flat data with every inequality whose side is +inf (an absent bound) made a row that
    holds for every z (``sides.without_absent``), and the (B, k) mask of those rows;
    ``sides.with_absent`` maps the solution back."""
    Q, p, G, h, A, b = flat
    absent = torch.isposinf(h)
    G, h = without_absent(G, h, absent)
    return (Q, p, G, h, A, b), absent
