"""Small per-token work of a CPU decode step in numba: RMSNorm (and the residual add before it),
and the router with the choice of experts, for a few float32 rows.

At decode a norm is 2048 numbers, and torch's fused ``rms_norm`` still took 20 us warm and
30-100 us in a decode step, where the weight-streaming kernels had just flushed the caches its
dispatch runs on; the same arithmetic as one numba call on the arrays takes 1-4 us. The
router's linear, softmax and top-k took ~250 us a layer the same way.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from localseek.quant.cpu.kernels import FASTMATH, activations


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    n = x.shape[1]
    for r in range(x.shape[0]):
        ss = np.float32(0)
        for i in range(n):
            ss += x[r, i] * x[r, i]
        inv = np.float32(1) / np.sqrt(ss / np.float32(n) + np.float32(eps))
        for i in range(n):
            out[r, i] = (x[r, i] * inv) * w[i]


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _add_rms_norm(
    x: np.ndarray, a: np.ndarray, w: np.ndarray, eps: float, s: np.ndarray, out: np.ndarray
) -> None:
    for r in range(x.shape[0]):
        for i in range(x.shape[1]):
            s[r, i] = x[r, i] + a[r, i]
    _rms_norm(s, w, eps, out)


def _rows(t: torch.Tensor) -> np.ndarray:
    return activations(t.reshape(-1, t.shape[-1]))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / rms(x) over the last dimension, float32 (as ``F.rms_norm``)."""
    out = np.empty(x.shape, dtype=np.float32)
    _rms_norm(_rows(x), w.numpy(), eps, out.reshape(-1, x.shape[-1]))
    return torch.from_numpy(out)


def add_rms_norm(
    x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + a, rms_norm(x + a)): a residual add and the next sub-layer's norm in one call."""
    s = np.empty(x.shape, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    n = x.shape[-1]
    _add_rms_norm(_rows(x), _rows(a), w.numpy(), eps, s.reshape(-1, n), out.reshape(-1, n))
    return torch.from_numpy(s), torch.from_numpy(out)


# --- the router, and the choice of each token's experts -------------------------------------

GREEDY, GROUP_MAX, GROUP_TOP2 = 0, 1, 2  # topk_method: greedy, group_limited_greedy, noaux_tc


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _route(x, gate, bias, sigmoid, n_group, topk_group, method, norm, v2, scale, ids, wts):
    N, K = ids.shape
    E = gate.shape[0]
    per = E // n_group
    scores = np.empty(E, dtype=np.float32)
    choice = np.empty(E, dtype=np.float64)  # float64: -inf masks and exact float32 sums
    gsc = np.empty(n_group, dtype=np.float64)
    for t in range(N):
        for e in range(E):
            a = np.float32(0)
            for i in range(x.shape[1]):
                a += x[t, i] * gate[e, i]
            scores[e] = a
        if sigmoid:
            for e in range(E):
                scores[e] = np.float32(1) / (np.float32(1) + np.exp(-scores[e]))
        else:
            top = scores.max()
            tot = np.float32(0)
            for e in range(E):
                scores[e] = np.exp(scores[e] - top)
                tot += scores[e]
            for e in range(E):
                scores[e] /= tot
        for e in range(E):
            choice[e] = scores[e] + bias[e] if bias.shape[0] else scores[e]
        if n_group > 1 and method != GREEDY:
            for grp in range(n_group):
                g0 = grp * per
                if method == GROUP_TOP2:  # the sum of the group's two best
                    b1 = b2 = -np.inf
                    for e in range(g0, g0 + per):
                        v = choice[e]
                        if v > b1:
                            b1, b2 = v, b1
                        elif v > b2:
                            b2 = v
                    gsc[grp] = np.float32(np.float32(b1) + np.float32(b2))
                else:
                    gsc[grp] = choice[g0 : g0 + per].max()
            for _ in range(n_group - topk_group):  # drop the worst groups
                worst = 0
                for grp in range(1, n_group):
                    if gsc[grp] <= gsc[worst]:
                        worst = grp
                gsc[worst] = np.inf
                choice[worst * per : (worst + 1) * per] = -np.inf
        tot = np.float32(0)
        for k in range(K):  # best first; the lower id on a tie
            best = 0
            for e in range(1, E):
                if choice[e] > choice[best]:
                    best = e
            ids[t, k] = best
            wts[t, k] = scores[best]
            tot += scores[best]
            choice[best] = -np.inf
        if norm and (K > 1 or not v2):
            for k in range(K):
                wts[t, k] = wts[t, k] / (tot + np.float32(1e-20))
            if not v2:
                for k in range(K):
                    wts[t, k] *= np.float32(scale)
        else:
            for k in range(K):
                wts[t, k] *= np.float32(scale)


def route(
    x: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None,
    sigmoid: bool,
    n_group: int,
    topk_group: int,
    method: int,
    k: int,
    norm: bool,
    v2: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's logits x @ gate.T and ``model.moe.route`` on them, for a few float32 rows:
    topk_ids (N, k) int64, topk_weights (N, k) float32."""
    xs = _rows(x)
    ids = np.empty((xs.shape[0], k), dtype=np.int64)
    wts = np.empty((xs.shape[0], k), dtype=np.float32)
    b = np.zeros(0, np.float32) if bias is None else bias.numpy()
    _route(xs, gate.numpy(), b, sigmoid, n_group, topk_group, method, norm, v2, scale, ids, wts)
    return torch.from_numpy(ids), torch.from_numpy(wts)
