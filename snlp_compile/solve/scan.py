"""Correction step of the SNLP solve: the affine recurrence over a leading layer axis.

    h_j = a_j h_{j-1} + d_j,    j = 0..N-1,    h_{-1} = h_init given.

Everything here is plain tensor ops (slicing, cat, expand, mul, add, matmul, cumsum); the only
Python loop is over the ``ceil(log2 N)`` scan levels, whose count depends on the static length N
alone, so the functions trace unchanged under ``torch.compile``, ``torch.export`` and
``torch.onnx.export(dynamo=True)`` (no ``while``/``scan`` higher-order op, no ONNX Loop/Scan).

Conventions. ``a`` and ``d`` carry the layer axis first. Elementwise: ``a`` is ``(N, *s)`` with
``s`` right-aligned against ``d.shape[1:]`` (``(N,)`` = one scalar per layer). Matrix: ``a`` is
``(N, *batch, n, n)``, ``d`` is ``(N, *batch, n, m)``, ``h_init`` is ``(*batch, n, m)``; batch dims
broadcast and are right-aligned *behind* the layer axis (``a`` of shape ``(N, n, n)`` with ``d``
of shape ``(N, B, T, n, m)`` is static mixing, not a misaligned batch). The result has the layer
axis first and the broadcast shape of all inputs behind it.

Log-depth scan (Hillis-Steele) over pairs (A, D), (A2, D2) o (A1, D1) = (A2 A1, A2 D1 + D2).
``h_init`` is folded into the first element (d_0 <- a_0 h_init + d_0), so after the last level
h_j = D_j. Each level combines element j with element j - offset for j >= offset; elements
j < offset are kept as they are, which equals combining them with the identity pair (I, 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "apply_prefix_products",
    "elementwise_affine_scan",
    "identity_scan",
    "matrix_affine_scan",
    "sequential_affine_recurrence",
    "static_init_products",
    "static_prefix_products",
]


def _align_elementwise(a: Tensor, d: Tensor, lead: int = 1) -> Tensor:
    """Reshape ``a`` of shape (*lead dims, *s) so that ``s`` right-aligns against ``d.shape[1:]``."""
    missing = d.dim() - 1 - (a.dim() - lead)
    if missing <= 0:
        return a
    return a.reshape(*a.shape[:lead], *([1] * missing), *a.shape[lead:])


def _align_matrix(a: Tensor, d: Tensor, lead: int = 1) -> Tensor:
    """Insert unit batch dims after the ``lead`` layer axes of ``a`` to match ``d``'s batch rank."""
    missing = (d.dim() - 3) - (a.dim() - lead - 2)
    if missing <= 0:
        return a
    return a.reshape(*a.shape[:lead], *([1] * missing), *a.shape[lead:])


def identity_scan(d: Tensor, h_init: Tensor) -> Tensor:
    """Recurrence with a_j = I: ``h_j = h_init + sum_{i<=j} d_i`` (one cumsum)."""
    return h_init + torch.cumsum(d, dim=0)


def elementwise_affine_scan(a: Tensor, d: Tensor, h_init: Tensor) -> Tensor:
    """``h_j = a_j * h_{j-1} + d_j`` with elementwise (scalar / diagonal) ``a_j``; log-depth scan."""
    n_layers = d.shape[0]
    a = _align_elementwise(a, d)
    out = torch.broadcast_shapes(a.shape[1:], d.shape[1:], h_init.shape)
    first = a[:1] * h_init + d[:1]
    big_d = torch.cat([first.expand(1, *out), d[1:].expand(n_layers - 1, *out)], dim=0)
    big_a = a
    offset = 1
    while offset < n_layers:
        tail = n_layers - offset
        big_d = torch.cat([big_d[:offset], big_a[offset:] * big_d[:tail] + big_d[offset:]], dim=0)
        if 2 * offset < n_layers:  # the products are not needed after the last level
            big_a = torch.cat([big_a[:offset], big_a[offset:] * big_a[:tail]], dim=0)
        offset *= 2
    return big_d


def matrix_affine_scan(a: Tensor, d: Tensor, h_init: Tensor) -> Tensor:
    """``h_j = a_j @ h_{j-1} + d_j`` with ``a_j`` an n x n matrix (HC-Newton); log-depth scan."""
    n_layers = d.shape[0]
    a = _align_matrix(a, d)
    batch = torch.broadcast_shapes(a.shape[1:-2], d.shape[1:-2], h_init.shape[:-2])
    out = (*batch, *d.shape[-2:])
    first = a[:1] @ h_init + d[:1]
    big_d = torch.cat([first.expand(1, *out), d[1:].expand(n_layers - 1, *out)], dim=0)
    big_a = a
    offset = 1
    while offset < n_layers:
        tail = n_layers - offset
        big_d = torch.cat([big_d[:offset], big_a[offset:] @ big_d[:tail] + big_d[offset:]], dim=0)
        if 2 * offset < n_layers:
            big_a = torch.cat([big_a[:offset], big_a[offset:] @ big_a[:tail]], dim=0)
        offset *= 2
    return big_d


def _cumulative_products(a: Tensor, matrix: bool) -> Tensor:
    """``P_j = a_j a_{j-1} ... a_0`` along dim 0 (log-depth; matmul when ``matrix``)."""
    n_layers = a.shape[0]
    offset = 1
    while offset < n_layers:
        tail = n_layers - offset
        prod = a[offset:] @ a[:tail] if matrix else a[offset:] * a[:tail]
        a = torch.cat([a[:offset], prod], dim=0)
        offset *= 2
    return a


def static_init_products(a: Tensor, matrix: bool) -> Tensor:
    """``P`` with ``P_j = a_j a_{j-1} ... a_0``, same shape as ``a`` (the weight of ``h_init``)."""
    return _cumulative_products(a, matrix)


def static_prefix_products(a: Tensor, matrix: bool) -> Tensor:
    """Transfer matrix ``T[j, i] = a_j ... a_{i+1}`` (I on the diagonal, 0 above it).

    Shape ``(N, N, *a.shape[1:])``. Meant for a static ``a`` (computed once at transform time);
    pair it with :func:`static_init_products` and :func:`apply_prefix_products`.
    """
    n_layers = a.shape[0]
    rows = torch.arange(n_layers, device=a.device)
    strictly_lower = rows[:, None] > rows[None, :]  # [j, i]: j > i
    lower = (rows[:, None] >= rows[None, :]).to(a.dtype)
    unit = [1] * (a.dim() - 1)
    full = a.unsqueeze(1).expand(n_layers, n_layers, *a.shape[1:])
    if matrix:
        ident = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    else:
        ident = torch.ones((), dtype=a.dtype, device=a.device)
    factors = torch.where(strictly_lower.reshape(n_layers, n_layers, *unit), full, ident)
    lower = lower.reshape(n_layers, n_layers, *unit)
    # column i: cumulative product of (I, .., I, a_{i+1}, .., a_{N-1}) down the rows.
    return _cumulative_products(factors, matrix) * lower


def apply_prefix_products(T: Tensor, d: Tensor, h_init: Tensor, matrix: bool, P: Tensor) -> Tensor:
    """``h = T d + P h_init``, i.e. ``h_j = sum_{i<=j} T[j, i] d_i + P_j h_init``.

    ``T`` from :func:`static_prefix_products`, ``P`` from :func:`static_init_products`; shapes
    align with ``d`` and ``h_init`` as in the scans. When ``a`` has no non-unit trailing/batch
    dims this is one (block) matmul over the layer axis; otherwise it falls back to a broadcast
    multiply and sum over i, which holds an (N, N, ...) intermediate.
    """
    n_layers = d.shape[0]
    if matrix:
        T = _align_matrix(T, d, lead=2)
        P = _align_matrix(P, d)
        init = P @ h_init
        n, m = d.shape[-2], d.shape[-1]
        if all(s == 1 for s in T.shape[2:-2]):
            # block matrix (N n, N n) times d laid out as (N n, batch * m).
            blocks = T.reshape(n_layers, n_layers, n, n).transpose(1, 2).reshape(n_layers * n, n_layers * n)
            batch = d.shape[1:-2]
            nb = len(batch)
            perm = (0, nb + 1, *range(1, nb + 1), nb + 2)
            cols = d.permute(perm).reshape(n_layers * n, -1)
            inv = (0, *range(2, nb + 2), 1, nb + 2)
            summed = (blocks @ cols).reshape(n_layers, n, *batch, m).permute(inv)
        else:
            summed = (T @ d.unsqueeze(0)).sum(dim=1)
        return summed + init
    T = _align_elementwise(T, d, lead=2)
    P = _align_elementwise(P, d)
    init = P * h_init
    if all(s == 1 for s in T.shape[2:]):
        summed = (T.reshape(n_layers, n_layers) @ d.reshape(n_layers, -1)).reshape(d.shape)
    else:
        summed = (T * d.unsqueeze(0)).sum(dim=1)
    return summed + init


def sequential_affine_recurrence(a: Tensor | None, d: Tensor, h_init: Tensor, matrix: bool) -> Tensor:
    """Reference: the plain loop ``h_j = a_j h_{j-1} + d_j`` (``a=None`` means a_j = I)."""
    if a is not None:
        a = _align_matrix(a, d) if matrix else _align_elementwise(a, d)
    h = h_init
    out = []
    for j in range(d.shape[0]):
        step = h if a is None else a[j] @ h if matrix else a[j] * h
        h = step + d[j]
        out.append(h)
    return torch.stack(out, dim=0)
