"""Decayed linear attention: a matrix state S that forgets by a per-step, per-head decay.

    S_t = lambda_t * S_{t-1} + k_t v_t^T          S: [Dk, Dv], 0 < lambda_t <= 1
    o_t = q_t^T S_t

(flash-linear-attention calls this "simple GLA": one scalar decay per head and step). A
normalised memory is the same op with a column of ones appended to v: its last output column is
q_t^T z_t with z_t = lambda_t z_{t-1} + k_t.

Three implementations of one computation, all taking log-decays `g = log(lambda)` <= 0:

- `recurrent_linear_attention`: the naive reference, one step at a time (also the decode path).
- `chunked_linear_attention_loop`: the readable chunked form. Inside a chunk of C steps the decay
  between positions j <= i is exp(b_i - b_j) with b the cumulative log-decay inside the chunk:
  an exponent that is never positive, so no overflow at any decay (the cumsum-then-exp(+-C)
  parallel form overflows after a few dozen steps at lambda = 0.1). S and z are carried between
  chunks in fp32.
- `chunked_linear_attention`: the same chunked form with no Python loop: the intra-chunk part
  as one batched matmul over every chunk, and the chunk-to-chunk carry as a lower-triangular
  matrix of exp(G_m - G_m') (again never a positive exponent) times the per-chunk state updates.
  Input-dtype (bf16 under autocast) matmuls inside chunks, fp32 state; torch.compile-able (no
  data-dependent control flow).

`DecayedLinearMemory` is the block built on them: projections, phi(u) = elu(u) + 1 feature maps,
a data-dependent decay lambda_t = alpha * (lambda_min + (1 - lambda_min) * sigmoid(W x_t)) where
alpha (the plasticity) is given by the caller, and the normalised read-out.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.errors import ConfigError

# Shapes used throughout: q, k [B, H, T, Dk]; v [B, H, T, Dv]; g [B, H, T] (log-decay, <= 0);
# state [B, H, Dk, Dv] fp32. Every function returns (o [B, H, T, Dv] fp32, final state fp32).


def _no_autocast(fn):
    """Run `fn` with autocast off: its fp32 states and decays must stay fp32 under a bf16 autocast
    (which would otherwise recast every matmul); low-precision matmuls are chosen explicitly."""
    @functools.wraps(fn)
    def wrapper(q: torch.Tensor, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)
    return wrapper


@_no_autocast
def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t, in fp32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    s = q.new_zeros(b, h, dk, dv, dtype=torch.float32) if state is None else state.float()
    q, k, v, decay = q.float(), k.float(), v.float(), g.float().exp()
    outputs = []
    for i in range(t):
        s = decay[:, :, i, None, None] * s + k[:, :, i, :, None] * v[:, :, i, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, i], s))
    o = torch.stack(outputs, dim=2) if outputs else q.new_zeros(b, h, 0, dv)
    return o, s


def _pad_to_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int):
    """Pad T up to a multiple of `chunk`: padded steps have k = 0 (write nothing) and g = 0
    (lambda = 1, forget nothing), so the final state is that of the real steps."""
    t = q.shape[2]
    pad = -t % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad))
    return q, k, v, g


@_no_autocast
def chunked_linear_attention_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                  state: torch.Tensor | None = None, chunk_size: int = 64
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form, one chunk at a time, in fp32 (readable; the fast path is
    `chunked_linear_attention`)."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    q, k, v, g = _pad_to_chunks(q.float(), k.float(), v.float(), g.float(), chunk_size)
    s = q.new_zeros(b, h, dk, dv) if state is None else state.float()
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    outputs = []
    for start in range(0, q.shape[2], chunk_size):
        qc, kc, vc = (x[:, :, start:start + chunk_size] for x in (q, k, v))
        bc = g[:, :, start:start + chunk_size].cumsum(-1)  # [B, H, C] cumulative log-decay in the chunk
        # exp(b_i - b_j) for j <= i; the masked entries would be positive exponents: set to -inf first
        decay = torch.where(causal, bc[..., :, None] - bc[..., None, :], float("-inf")).exp()  # [B, H, C, C]
        intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # [B, H, C, Dv]
        inter = (qc * bc.exp()[..., None]) @ s  # the state from before the chunk, decayed to i
        outputs.append(intra + inter)
        to_end = (bc[..., -1:] - bc).exp()  # [B, H, C]: decay from j to the chunk's end
        s = bc[..., -1, None, None].exp() * s + (kc * to_end[..., None]).transpose(-1, -2) @ vc
    return torch.cat(outputs, dim=2)[:, :, :t], s


@_no_autocast
def chunked_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             state: torch.Tensor | None = None, chunk_size: int = 64
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form with no loop over chunks (see the module docstring). Matmuls inside a
    chunk run in the inputs' dtype (fp32 accumulation); decays, states and outputs are fp32."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v, g = _pad_to_chunks(q.to(dtype), k.to(dtype), v.to(dtype), g.float(), chunk_size)
    n = q.shape[2] // chunk_size
    c = chunk_size
    qc, kc, vc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))  # [B, H, N, C, D]
    bc = g.reshape(b, h, n, c).cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()

    # intra-chunk: one batched matmul over all chunks
    decay = torch.where(causal, bc[..., :, None] - bc[..., None, :], float("-inf")).exp()  # [B, H, N, C, C]
    scores = (qc @ kc.transpose(-1, -2)).float() * decay
    intra = (scores.to(vc.dtype) @ vc).float()  # [B, H, N, C, Dv]

    # each chunk's own contribution to the state at its end: sum_j exp(b_end - b_j) k_j v_j^T
    to_end = (bc[..., -1:] - bc).exp()  # [B, H, N, C]
    updates = ((kc.float() * to_end[..., None]).transpose(-1, -2) @ vc.float())  # [B, H, N, Dk, Dv] fp32
    # the state before chunk m is sum_{m' < m} exp(G_{m-1} - G_{m'}) U_{m'} (+ the incoming state,
    # as a chunk m' = -1 with no decay of its own): a lower-triangular weight matrix over chunks
    initial = q.new_zeros(b, h, 1, dk, dv, dtype=torch.float32) if state is None else state.float()[:, :, None]
    updates = torch.cat([initial, updates], dim=2)  # [B, H, N+1, Dk, Dv]
    totals = F.pad(bc[..., -1].cumsum(-1), (1, 0))  # [B, H, N+1]: G, with G_{-1} = 0 for the incoming state
    lower = torch.ones(n + 1, n + 1, dtype=torch.bool, device=q.device).tril()
    weights = torch.where(lower, totals[..., :, None] - totals[..., None, :], float("-inf")).exp()  # [B, H, N+1, N+1]
    states = (weights @ updates.flatten(-2)).view(b, h, n + 1, dk, dv)  # state after each pseudo-chunk
    inter = (qc.float() * bc.exp()[..., None]) @ states[:, :, :n]  # [B, H, N, C, Dv]
    o = (intra + inter).reshape(b, h, n * c, dv)[:, :, :t]
    return o, states[:, :, n]


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     state: torch.Tensor | None = None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: a few steps (decoding) run the recurrence, anything longer the chunked form.
    Both compute the same thing (tested); the choice is only about speed."""
    if q.shape[2] <= 4:
        return recurrent_linear_attention(q, k, v, g, state)
    return chunked_linear_attention(q, k, v, g, state, chunk_size)


def check_plasticity(alpha: float) -> float:
    """The plasticity alpha scales every decay: it must lie in (0, 1]."""
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) <= 1.0) or math.isnan(float(alpha)):
        raise ConfigError(f"plasticity alpha must be in (0, 1], got {alpha}")
    return float(alpha)


class DecayedLinearMemory(nn.Module):
    """Normalised decayed linear attention over heads (the "Hebbian memory" of fast weights).

        q = phi(W_q x) / sqrt(E), k = phi(W_k x), v = W_v x, phi(u) = elu(u) + 1
        lambda_t = alpha * (lambda_min + (1 - lambda_min) * sigmoid(W_lambda x_t))  per head
        o_t = q_t^T S_t / (q_t^T z_t + eps)

    forward(x [B, T, C], alpha, state) -> (o [B, T, H*E] in x's dtype, state [B, H, E, E+1] fp32).
    The state holds S and z side by side (z is the last column)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, min_decay: float = 0.9,
                 init_decay: float = 0.998, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        if not 0.0 <= min_decay < init_decay < 1.0:
            raise ConfigError(f"need 0 <= min_decay < init_decay < 1, got {min_decay} and {init_decay}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.min_decay, self.init_decay = min_decay, init_decay
        self.chunk_size, self.eps = chunk_size, eps
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.decay_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.reset_decay_bias()

    def reset_decay_bias(self) -> None:
        """Bias so that lambda = init_decay at alpha = 1 for a zero input (long memory at start)."""
        share = (self.init_decay - self.min_decay) / (1.0 - self.min_decay)
        nn.init.constant_(self.decay_proj.bias, math.log(share / (1.0 - share)))

    def log_decay(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """x [B, T, C] -> log lambda [B, H, T] in fp32 (<= 0 for alpha in (0, 1])."""
        gate = torch.sigmoid(self.decay_proj(x).float())  # [B, T, H]
        decay = self.min_decay + (1.0 - self.min_decay) * gate
        return (decay.log() + math.log(alpha)).transpose(1, 2)

    def forward(self, x: torch.Tensor, alpha: float, state: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h, e = self.num_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = (F.elu(q.view(b, t, h, e).transpose(1, 2)) + 1) / math.sqrt(e)  # [B, H, T, E]
        k = F.elu(k.view(b, t, h, e).transpose(1, 2)) + 1
        v = v.view(b, t, h, e).transpose(1, 2)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [B, H, T, E+1]: last column -> z
        out, state = linear_attention(q, k, v, self.log_decay(x, alpha), state, self.chunk_size)
        o = out[..., :e] / (out[..., e:] + self.eps)  # [B, H, T, E] fp32
        return o.transpose(1, 2).reshape(b, t, h * e).to(x.dtype), state
