"""OneEventNet's forward compiled (numba): the single-event forecast the service serves.

The numpy form of the same arithmetic is about 35 calls on small arrays; here it is one call of
plain loops, compiled once (cached on disk beside this file, or in NUMBA_CACHE_DIR), in float64,
without fastmath (IEEE arithmetic, the same result on every call). It keeps the interpreter lock
throughout: with Predicts in flight, numpy's matrix products let another handler thread in at each
of them, and each hand-off costs the core a thread switch. docs/PERFORMANCE.md has the numbers.

Every forecast runs it, one event at a time (Snapshot.predict). Only a process that forecasts
imports this module (OneEventNet.bind: the service process, the in-process class on its first
forecast); the trainer process, which folds the snapshots it sends, never does.
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
from numba import njit

log = logging.getLogger("titan_fusion.server.onekernel")


def _compiled(fn):
    """njit, cached on disk when there is somewhere to write the cache: beside this file, or in
    NUMBA_CACHE_DIR, or a user-wide cache directory. Where none is writable (a read-only install
    and home), it compiles at each start instead (about 1.5 s) rather than fail."""
    try:
        return njit(cache=True, error_model="numpy")(fn)
    except RuntimeError as e:  # numba: "cannot cache function ...: no locator available"
        log.warning("the compiled forward cannot be cached (%s): it is compiled again at each start", e)
        return njit(error_model="numpy")(fn)


@njit(error_model="numpy")  # compiled into forward, and cached with it
def _times(a, b):  # pragma: no cover - compiled
    """a @ b, a row at a time: the innermost loop runs along b's rows, which LLVM vectorizes."""
    r, k = a.shape
    m = b.shape[1]
    out = np.zeros((r, m))
    for i in range(r):
        for c in range(k):
            x = a[i, c]
            for j in range(m):
                out[i, j] += x * b[c, j]
    return out


@njit(error_model="numpy")  # compiled into forward, and cached with it
def _inv_norm(x):  # pragma: no cover - compiled
    """1 / |x|: a LayerNorm's scale, folded (x is centered, and carries sqrt(eps))."""
    ss = 0.0
    for i in range(x.shape[0]):
        ss += x[i] * x[i]
    return 1.0 / math.sqrt(ss)


@njit(error_model="numpy")  # compiled into forward, and cached with it
def _minus_max(x):  # pragma: no cover - compiled
    """x -= max(x), in place: a softmax's shift, for scores that no bound keeps from overflowing."""
    m = x[0]
    for i in range(1, x.shape[0]):
        m = max(m, x[i])
    for i in range(x.shape[0]):
        x[i] -= m


@njit(error_model="numpy")  # compiled into forward, and cached with it
def _tanh(x):  # pragma: no cover - compiled
    """tanh through one exp: libm's tanh cost 3.6 of the forward's 23.9 us (its 896 GELUs). For |x|
    near 0 it keeps an absolute error of about 1e-16 (not a relative one), which is what the GELU
    needs: (tanh + 1) * x."""
    if x > 20.0:  # tanh is 1 to the last bit from about 19.1 on
        return 1.0
    if x < -20.0:
        return -1.0
    e = math.exp(2.0 * x)
    return (e - 1.0) / (e + 1.0)


@_compiled
def forward(u, M, W1, bq, W2, fc_bias, W3, wkq, skill, n, ne, nh, C, T, b_d, b_x, b_rg, b_wkq,
            head_bias, inv_nh, gelu_k, gelu_c, bounded):  # pragma: no cover - compiled; tests call it through OneEventNet
    """(prob_up, attention over the `ne` experts) for one event: OneEventNet.forward's algebra,
    written out. `wkq` is (nh, C1), or empty when it comes from u @ M (features); `skill` is (n,),
    or empty without skill_bias; the b_* are where each block of u @ M starts. No bounds checks:
    the caller passes len(u) == M.shape[0]. The tanh-GELU's constants come as arguments, not as
    globals, which the cache would keep after they changed."""
    C1 = C + 1
    R, O = M.shape
    o = np.zeros(O)  # u @ M
    for r in range(R):
        ur = u[r]
        if ur != 0.0:
            for j in range(O):
                o[j] += ur * M[r, j]
    # the centered tokens, normalized (LayerNorm 1; its gain and bias are in W1)
    d = o[b_d:b_d + T * C1].copy().reshape(T, C1)
    for t in range(T):
        d[t] *= _inv_norm(d[t])
    Q = W1.shape[1]
    qkv = _times(d, W1)
    # self-attention scores, (n * nh, T): the queries come masked per head
    kc = nh * C
    s = np.empty((n * nh, T))
    for i in range(n):
        for h in range(nh):
            for t in range(T):
                acc = 0.0
                for c in range(C):
                    acc += (qkv[i, h * C + c] + bq[h * C + c]) * qkv[t, kc + c]
                s[i * nh + h, t] = acc
    for r in range(n * nh):
        if not bounded:
            _minus_max(s[r])
        tot = 0.0
        for t in range(T):
            e = math.exp(s[r, t])
            s[r, t] = e
            tot += e
        inv = 1.0 / tot
        for t in range(T):
            s[r, t] *= inv
    # the attention output through the projection, plus the residual
    vc = (nh + 1) * C
    x2 = np.empty((n, C1))
    for i in range(n):
        for c in range(C1):
            x2[i, c] = o[b_x + i * C1 + c]
        for h in range(nh):
            base = vc + h * C1
            for t in range(T):
                w = s[i * nh + h, t]
                for c in range(C1):
                    x2[i, c] += w * qkv[t, base + c]
    # x2 @ W2: [x2 centered | its fc input | x2 + the MLP's bias, centered]
    P2 = W2.shape[1]
    dd = _times(x2, W2)
    H = P2 - 2 * C1
    g = np.empty((n, H))  # 2 GELU(h) (the 1/2 is in W3), after LayerNorm 2
    for i in range(n):
        inv = _inv_norm(dd[i, :C1])
        for j in range(H):
            hv = dd[i, C1 + j] * inv + fc_bias[j]
            g[i, j] = (_tanh(hv * (hv * hv * gelu_k + gelu_c)) + 1.0) * hv
    d3 = np.empty((n, C1))  # the pooling LayerNorm's input, centered
    for i in range(n):
        for c in range(C1):
            d3[i, c] = dd[i, P2 - C1 + c]
        for j in range(H):
            gv = g[i, j]
            for c in range(C1):
                d3[i, c] += gv * W3[j, c]
    # pooling scores per head, (nh, n)
    sc = np.empty((nh, n))
    for i in range(n):
        inv = _inv_norm(d3[i])
        for h in range(nh):
            acc = 0.0
            if wkq.shape[0] == 0:
                for c in range(C1):
                    acc += o[b_wkq + c * nh + h] * d3[i, c]
            else:
                for c in range(C1):
                    acc += wkq[h, c] * d3[i, c]
            sc[h, i] = acc * inv
            if skill.shape[0] != 0:
                sc[h, i] += skill[i]
    # per head: [shares over the experts (ne), the softmax's sum, the head's logit]
    K = ne + 1 + nh
    rows = np.zeros((nh, K))
    for h in range(nh):
        if not bounded:
            _minus_max(sc[h])
        for i in range(n):
            e = math.exp(sc[h, i])
            for k in range(K):
                rows[h, k] += e * o[b_rg + i * K + k]
    z = head_bias
    att = np.zeros(ne)
    for h in range(nh):
        inv = 1.0 / rows[h, ne]
        z += rows[h, ne + 1 + h] * inv
        inv *= inv_nh
        for k in range(ne):
            att[k] += rows[h, k] * inv
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z)), att
    e = math.exp(z)
    return e / (1.0 + e), att


_warm = False


def warm() -> None:
    """Compile `forward` now (or load it from its cache), on tiny arguments of the signature
    OneEventNet passes (read-only C-contiguous float64 arrays, a writable u): the service calls
    this while it starts, so that neither the first Predict nor the publication that first makes
    the fusion ready pays for it. A cache that cannot be written (a full or read-only disk) costs
    a warning, not the service: numba keeps what it compiled in memory."""
    global _warm
    if _warm:
        return

    def ro(*shape: int) -> np.ndarray:
        a = np.zeros(shape)
        a.setflags(write=False)
        return a
    # one expert, one head, C = 1 (C1 = 2), no features: u @ M is [d (2) | x (2) | rows (3)]
    args = (np.zeros(4), ro(4, 7), ro(2, 4), ro(1), ro(2, 5), ro(1), ro(1, 2), ro(1, 2), ro(0),
            1, 1, 1, 1, 1, 0, 2, 4, 7, 0.0, 1.0, 0.0, 0.0, True)
    try:
        forward(*args)
    except OSError as e:  # numba registers the compiled code before it saves the cache
        _forget_cache()
        log.warning("the compiled forward cannot be cached (%s): it is compiled again at each start", e)
        forward(*args)
    _warm = True


def _forget_cache() -> None:
    """Remove forward's cache index after a save that failed: numba writes the index before the
    compiled code, so the index would name a code file that the failed write left as it was (the
    previous version's, after an upgrade), and the next start would load that."""
    index = getattr(getattr(getattr(forward, "_cache", None), "_cache_file", None), "_index_path", None)
    if index:
        try:
            os.remove(index)
        except OSError:
            pass
