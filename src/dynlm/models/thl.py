"""THL, Transformer Hierarchical Layers: a recurrent model whose inference state is a fixed bank
of memory slots, K GRU tiers and a FIFO of recent embeddings. It never grows with the context.

Per token t (state: tiers s^(k), memory M [J, Dm] with per-slot metadata, FIFO of the previous W
embeddings, position t; all zero at the start):

1. e_t = Embed(token_t).
2. Local read: one attention head over the FIFO of the W previous embeddings (not e_t itself),
   no output projection -> l_t. Push e_t.
3. Memory read, H heads: u = [e_t; s^(0)_{t-1}; s^(K-1)_{t-1}], q_h = W_q,h u,
   score_{h,j} = q_h · W_k,h m_j / √d_h − λ·read_ema_j; top-κ slots per head (in training with
   Gumbel noise on the choice only), α = softmax of their clean scores,
   r_t = concat_h W_v,h Σ α m_j. read_ema ← ρ·read_ema + (1−ρ)·usage, last_read updated.
4. Tiers: x^(0) = [e_t; r_t + l_t], x^(k) = [s^(k)_t−1 of the tier below, new; r_t];
   s^(k) ← GRU_k(x^(k), s^(k)) when t mod τ_k = 0, else unchanged (τ_k = 2^k by default).
   Optional: pre-norm (RMSNorm on each input stream) and residual tiers (tier k adds the new
   state of tier k−1 to its GRU output).
5. Novelty writer: w = clip_norm(W_w [s^(0)_t; s^(K-1)_t] + b, 1); n = 1 − max_j cos(w, m_j);
   g = σ(β(n − θ)). Novel (n > θ): the first empty slot, else the slot with the highest
   staleness + under-use. Not novel: the most similar slot.
6. Bank: M ← γ·M, then M[chosen] += η·g·w (η, the write rate, is applied).
7. logits_t = W_o LayerNorm([s^(0)_t; ...; s^(K-1)_t]).

The tokens of a sequence are processed one step at a time (the recurrence is sequential), but
every part that does not depend on the state — embeddings, the local attention, the embedding
halves of the read query and of tier 0's gates, the output head — is computed for the whole
sequence at once. `compile_step=True` compiles the step (worth it on a GPU).

Memory: the inference state is O(1) in the tokens consumed. Training backpropagates through
every step of a sequence, so its activation memory is O(T·J·Dm); the trainer bounds it with
truncated BPTT (`bptt_chunk`): the sequence is fed in chunks, each chunk's loss is backpropagated
before the next, and the state is carried between chunks detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.base import DynModel, ModelOutput, causal_lm_loss
from dynlm.nn import RMSNorm
from dynlm.nn.local_attention import FifoAttention
from dynlm.nn.recurrent import GRUCell
from dynlm.nn.slot_memory import clip_norm, cosine_novelty, gumbel_noise, slot_usage, sparse_topk_read
from dynlm.registry import register

COMPILE_MODES = ("default", "reduce-overhead")


@dataclass
class THLConfig(ModelConfig):
    type: str = "thl"
    num_tiers: int = 3  # K
    tier_periods: list[int] | None = None  # τ_k; null: 2^k (the README); [1, 8, 64] is the reference code's
    memory_slots: int = 1024  # J
    memory_dim: int | None = None  # Dm; null: hidden_size
    read_heads: int = 4  # H
    read_head_dim: int | None = None  # d_h of the read queries/keys; null: hidden_size // read_heads
    read_topk: int = 4  # κ slots read per head
    load_penalty: float = 0.1  # λ
    read_ema_decay: float = 0.99  # ρ, for the read and write usage averages
    read_noise: float = 1.0  # scale of the Gumbel noise on the slot choice while training (0: none)
    local_window: int = 64  # W
    local_query_dim: int = 64
    write_rate: float = 0.05  # η
    memory_decay: float = 0.9995  # γ
    write_clip: float = 1.0  # max L2 norm of a written vector
    novelty_beta: float = 8.0  # β
    novelty_theta: float = 0.3  # θ
    tier_pre_norm: bool = False  # RMSNorm on each tier input stream
    tier_residual: bool = False  # tier k > 0 adds the new state of tier k-1 to its GRU output
    balance_loss_weight: float = 0.0  # slot-usage balance: weight of KL(read usage || uniform) in aux_loss
    bptt_chunk: int = 64  # training: tokens per truncated-BPTT chunk (0: the whole sequence)
    compile_step: bool = False  # torch.compile the per-token step
    compile_mode: str = "default"  # torch.compile mode of the step; "reduce-overhead": CUDA graphs while training
    tie_word_embeddings: bool = False  # the head reads K tiers, the embedding writes one vector
    max_position_embeddings: int = 1 << 30  # recurrent: no position limit

    def __post_init__(self) -> None:
        if self.memory_dim is None:
            self.memory_dim = self.hidden_size
        if self.read_head_dim is None:
            self.read_head_dim = self.hidden_size // max(1, self.read_heads)
        if self.tier_periods is None:
            self.tier_periods = [2**k for k in range(self.num_tiers)]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for name in ("num_tiers", "memory_slots", "memory_dim", "read_heads", "read_head_dim", "read_topk",
                     "local_window", "local_query_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if len(self.tier_periods) != self.num_tiers or any(p < 1 for p in self.tier_periods):
            raise ConfigError(f"model.tier_periods must be {self.num_tiers} periods >= 1, got {self.tier_periods}")
        if self.read_topk > self.memory_slots:
            raise ConfigError(f"model.read_topk ({self.read_topk}) must be <= model.memory_slots "
                              f"({self.memory_slots})")
        if self.hidden_size % self.read_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be a multiple of model.read_heads "
                              f"({self.read_heads})")
        if self.bptt_chunk < 0:
            raise ConfigError(f"model.bptt_chunk must be >= 0, got {self.bptt_chunk}")
        if self.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings must be false for thl",
                              "the head reads num_tiers * hidden_size features")
        for name in ("write_rate", "read_noise", "balance_loss_weight", "load_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"model.compile_mode must be one of {list(COMPILE_MODES)}, got '{self.compile_mode}'")
        for name in ("memory_decay", "read_ema_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"model.{name} must be in (0, 1], got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class THLState:
    """Everything THL carries from one token to the next; fixed size (fp32, metadata int64)."""

    tiers: torch.Tensor  # [K, B, C]
    memory: torch.Tensor  # [B, J, Dm]
    read_ema: torch.Tensor  # [B, J]
    write_ema: torch.Tensor  # [B, J]
    last_read: torch.Tensor  # [B, J] int64, -1 = never read
    last_write: torch.Tensor  # [B, J] int64, -1 = empty
    fifo: torch.Tensor  # [B, W, C] embeddings of the W previous positions, oldest first
    position: torch.Tensor  # [] int64, position of the next token

    @classmethod
    def zeros(cls, c: THLConfig, batch_size: int, device: torch.device | str | None = None) -> THLState:
        """The state before the first token: zeros, no slot read or written."""
        f32 = {"device": device, "dtype": torch.float32}
        never = torch.full((batch_size, c.memory_slots), -1, device=device, dtype=torch.long)
        return cls(tiers=torch.zeros(c.num_tiers, batch_size, c.hidden_size, **f32),
                   memory=torch.zeros(batch_size, c.memory_slots, c.memory_dim, **f32),
                   read_ema=torch.zeros(batch_size, c.memory_slots, **f32),
                   write_ema=torch.zeros(batch_size, c.memory_slots, **f32),
                   last_read=never, last_write=never.clone(),
                   fifo=torch.zeros(batch_size, c.local_window, c.hidden_size, **f32),
                   position=torch.zeros((), device=device, dtype=torch.long))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> THLState:
        return cls(*tensors)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def detach(self) -> THLState:
        """The same state cut from the autograd graph (truncated BPTT between chunks). Copied: a
        CUDA-graphed step writes its outputs into memory that its next replay reuses."""
        return THLState.from_tensors([t.detach().clone() for t in self.tensors()])


# ---------------------------------------------------------------------------------------------
# Blocks


class MemoryReader(nn.Module):
    """Step 3. The query's embedding half (`query_e`) is computed for a whole sequence at once;
    the tier half (`query_s`) at each step. Keys and values are never materialised for the bank:
    q_h · W_k,h m_j = (W_k,hᵀ q_h) · m_j, and Σ α W_v,h m_j = W_v,h Σ α m_j."""

    def __init__(self, c: THLConfig):
        super().__init__()
        self.heads, self.head_dim, self.topk = c.read_heads, c.read_head_dim, c.read_topk
        self.load_penalty = c.load_penalty
        self.query_e = nn.Linear(c.hidden_size, c.read_heads * c.read_head_dim, bias=False)
        self.query_s = nn.Linear(2 * c.hidden_size, c.read_heads * c.read_head_dim, bias=False)
        self.k_proj = nn.Linear(c.memory_dim, c.read_heads * c.read_head_dim, bias=False)
        self.v_proj = nn.Linear(c.memory_dim, c.hidden_size, bias=False)

    def forward(self, query_e: torch.Tensor, s_first: torch.Tensor, s_last: torch.Tensor, memory: torch.Tensor,
                read_ema: torch.Tensor, noise: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query_e [B, H*Dh], s_* [B, C], memory [B, J, Dm] -> (r [B, C], slots [B, H, κ], α [B, H, κ])."""
        b = query_e.shape[0]
        q = (query_e + self.query_s(torch.cat([s_first, s_last], dim=-1).to(query_e.dtype)))
        q = q.view(b, self.heads, self.head_dim)  # [B, H, Dh]
        w_k = self.k_proj.weight.view(self.heads, self.head_dim, -1)  # [H, Dh, Dm]
        q_mem = torch.einsum("bhd,hdm->bhm", q, w_k.to(q.dtype)) / math.sqrt(self.head_dim)  # [B, H, Dm]
        mixed, slots, alpha = sparse_topk_read(q_mem, memory, read_ema, self.load_penalty, self.topk, noise)
        w_v = self.v_proj.weight.view(self.heads, -1, mixed.shape[-1])  # [H, C/H, Dm]
        r = torch.einsum("bhm,hvm->bhv", mixed.to(q.dtype), w_v.to(q.dtype)).reshape(b, -1)  # [B, C]
        return r, slots, alpha


class Tier(nn.Module):
    """One GRU tier. Its input [a; r] is projected by two linears (W_ih [a; r] = W_a a + W_r r)."""

    def __init__(self, c: THLConfig):
        super().__init__()
        d = c.hidden_size
        self.norm_a = RMSNorm(d, c.rms_norm_eps) if c.tier_pre_norm else nn.Identity()
        self.norm_r = RMSNorm(d, c.rms_norm_eps) if c.tier_pre_norm else nn.Identity()
        self.input_a = nn.Linear(d, 3 * d)  # embedding (tier 0) or the tier below
        self.input_r = nn.Linear(d, 3 * d, bias=False)  # the memory read (+ local read for tier 0)
        self.cell = GRUCell(d)

    def gates_a(self, a: torch.Tensor) -> torch.Tensor:
        return self.input_a(self.norm_a(a.to(self.input_a.weight.dtype)))

    def forward(self, gates_a: torch.Tensor, r: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gates = gates_a + self.input_r(self.norm_r(r.to(gates_a.dtype)))
        return self.cell(gates, h)


class NoveltyWriter(nn.Module):
    """Steps 5 and 6: where to write, how much, and the bank update."""

    def __init__(self, c: THLConfig):
        super().__init__()
        self.c = c
        self.write_proj = nn.Linear(2 * c.hidden_size, c.memory_dim)

    def forward(self, s_first: torch.Tensor, s_last: torch.Tensor, memory: torch.Tensor, read_ema: torch.Tensor,
                write_ema: torch.Tensor, last_read: torch.Tensor, last_write: torch.Tensor, position: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (memory, write_ema, last_write, gate [B], novel [B] bool)."""
        c = self.c
        j = memory.shape[1]
        s = torch.cat([s_first, s_last], dim=-1).to(self.write_proj.weight.dtype)
        w = clip_norm(self.write_proj(s).float(), c.write_clip)  # [B, Dm]
        novelty, cos = cosine_novelty(w, memory)  # [B], [B, J]
        gate = torch.sigmoid(c.novelty_beta * (novelty - c.novelty_theta))  # [B]
        novel = novelty.detach() > c.novelty_theta
        empty = last_write < 0  # [B, J]
        slot_ids = torch.arange(j, device=memory.device)
        first_empty = torch.where(empty, j - slot_ids, 0).argmax(dim=-1)  # lowest empty index
        staleness = (position - last_read).float() / (position + 1).float()  # (0, 1]
        evict = (staleness + (1.0 - read_ema)).argmax(dim=-1)  # stale and under-used
        target = torch.where(novel, torch.where(empty.any(dim=-1), first_empty, evict), cos.argmax(dim=-1))
        # a comparison, not F.one_hot, whose range check compiles to a reduction and a device assert per token
        onehot = (target[:, None] == slot_ids).to(memory.dtype)  # [B, J]
        memory = c.memory_decay * memory + (c.write_rate * gate)[:, None, None] * onehot[:, :, None] * w[:, None, :]
        rho = c.read_ema_decay
        write_ema = rho * write_ema + (1 - rho) * onehot * gate[:, None].detach()
        last_write = torch.where(onehot.bool(), position, last_write)
        return memory, write_ema, last_write, gate, novel


# ---------------------------------------------------------------------------------------------
# Model


@register("thl", THLConfig)
class THLModel(DynModel):
    constant_state = True

    def __init__(self, config: THLConfig):
        super().__init__(config)
        c = config
        d = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, d)
        self.local_attention = FifoAttention(d, c.local_query_dim, d, c.local_window)
        self.reader = MemoryReader(c)
        self.tiers = nn.ModuleList(Tier(c) for _ in range(c.num_tiers))
        self.writer = NoveltyWriter(c)
        self.out_norm = nn.LayerNorm(c.num_tiers * d)
        self.lm_head = nn.Linear(c.num_tiers * d, c.vocab_size, bias=False)
        self.register_buffer("tier_periods", torch.tensor(c.tier_periods, dtype=torch.long), persistent=False)
        self.noise_generator: torch.Generator | None = None  # set to make the read noise reproducible
        self.init_weights()
        self._step_fn = self.step
        self._graphed = c.compile_step and c.compile_mode == "reduce-overhead"
        if c.compile_step:
            self._step_fn = torch.compile(self.step, dynamic=False, mode=c.compile_mode)

    def _step_for_this_forward(self):
        """The step to run. CUDA graphs ("reduce-overhead") serve training only: each captured
        call is a node of the graph tree, so a long inference loop would capture one per token."""
        if not self._graphed:
            return self._step_fn
        if self.training and torch.is_grad_enabled():
            torch.compiler.cudagraph_mark_step_begin()  # a new chunk: the previous one's outputs are done with
            return self._step_fn
        return self.step

    @property
    def memory_bank(self) -> NoveltyWriter:
        return self.writer

    @property
    def bptt_chunk(self) -> int | None:
        """Trainer hook: feed training sequences in chunks of this many tokens, backpropagate each
        chunk and carry the state detached (truncated BPTT). None: the whole sequence."""
        return self.config.bptt_chunk or None

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, max_length: int = 0) -> THLState:
        """Zeros; fp32 whatever `dtype` (recurrent state and accumulators stay fp32)."""
        device = device if device is not None else self.lm_head.weight.device
        return THLState.zeros(self.config, batch_size, device)

    def step(self, query_e: torch.Tensor, gates0: torch.Tensor, local: torch.Tensor, noise: torch.Tensor | None,
             tiers: torch.Tensor, memory: torch.Tensor, read_ema: torch.Tensor, write_ema: torch.Tensor,
             last_read: torch.Tensor, last_write: torch.Tensor, position: torch.Tensor,
             ) -> tuple[torch.Tensor, ...]:
        """One token (steps 3-6). query_e [B, H*Dh], gates0 [B, 3C] and local [B, C] are the
        token's precomputed parts. Returns the new (tiers, memory, read_ema, write_ema, last_read,
        last_write) and the read usage [B, J], gate [B], novel [B]."""
        c = self.config
        s = list(tiers.unbind(0))  # K x [B, C]
        r, slots, alpha = self.reader(query_e, s[0], s[-1], memory, read_ema, noise)
        usage = slot_usage(slots, alpha, c.memory_slots)  # [B, J]
        rho = c.read_ema_decay
        read_ema = rho * read_ema + (1 - rho) * usage.detach()
        last_read = torch.where(usage > 0, position, last_read)
        update = (position % self.tier_periods) == 0  # [K]
        below = None
        for k, tier in enumerate(self.tiers):
            if k == 0:
                new = tier(gates0, r + local, s[0])
            else:
                new = tier(tier.gates_a(below), r, s[k])
                if c.tier_residual:
                    new = new + below
            s[k] = torch.where(update[k], new.float(), s[k])
            below = s[k]
        memory, write_ema, last_write, gate, novel = self.writer(
            s[0], s[-1], memory, read_ema, write_ema, last_read, last_write, position)
        return torch.stack(s), memory, read_ema, write_ema, last_read, last_write, usage, gate, novel

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, state: THLState | None = None,
                use_cache: bool = False) -> ModelOutput:
        b, t = input_ids.shape
        c = self.config
        carried = state is not None
        if state is None:
            state = self.init_state(b, device=input_ids.device)
        # parallel part: everything that does not depend on the recurrence
        e = self.embed_tokens(input_ids)  # [B, T, C]
        local, fifo = self.local_attention(e, state.fifo, state.position)  # [B, T, C], [B, W, C]
        query_e = self.reader.query_e(e)  # [B, T, H*Dh]
        gates0 = self.tiers[0].gates_a(e)  # [B, T, 3C]
        noise = None
        if self.training and c.read_noise > 0:  # drawn for the whole sequence at once: no per-token launch
            shape = (t, b, c.read_heads, c.memory_slots)
            noise = c.read_noise * gumbel_noise(shape, input_ids.device, self.noise_generator)
        tiers, memory, read_ema, write_ema = state.tiers, state.memory, state.read_ema, state.write_ema
        if c.compile_step and torch.is_grad_enabled():
            # every later step gets tiers and memory that require grad (they depend on the weights): the
            # first one too, so that one compiled graph (forward and backward) serves all steps instead of two
            tiers, memory = (x if x.requires_grad else x.detach().requires_grad_() for x in (tiers, memory))
        last_read, last_write, position = state.last_read, state.last_write, state.position
        outputs, usages, gates, novels = [], [], [], []
        step = self._step_for_this_forward()
        # unbind, not query_e[:, i]: backward then stacks each input's T gradients once, where indexing
        # would zero-fill and add a whole [B, T, ...] gradient for every token (3 kernels per input per token).
        # Time-major and contiguous first: a token's slice of [B, T, X] has the stride T*X, and the compiled
        # step (dynamic=False) guards on strides, so it would be compiled again for every sequence length
        per_token = zip(*(x.transpose(0, 1).contiguous().unbind(0) for x in (query_e, gates0, local)))
        for i, (query_e_i, gates0_i, local_i) in enumerate(per_token):
            tiers, memory, read_ema, write_ema, last_read, last_write, usage, gate, novel = step(
                query_e_i, gates0_i, local_i, None if noise is None else noise[i], tiers, memory,
                read_ema, write_ema, last_read, last_write, position)
            position = position + 1
            outputs.append(tiers)
            usages.append(usage)
            gates.append(gate)
            novels.append(novel)
        # the per-token metrics are reduced once per forward, not once per token
        usage_sum = torch.stack(usages).sum(0)  # [B, J]
        gate_mean = torch.stack(gates).detach().mean()
        novel_frac = torch.stack(novels).float().mean()
        h = torch.stack(outputs, dim=2)  # [K, B, T, C]
        h = h.permute(1, 2, 0, 3).reshape(b, t, -1)  # [B, T, K*C]: [s^(0); ...; s^(K-1)]
        logits = self.lm_head(self.out_norm(h.to(e.dtype)))  # [B, T, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None

        # slot-usage balance: KL(read usage over this forward || uniform), per row
        p = usage_sum / usage_sum.sum(dim=-1, keepdim=True).clamp(min=1e-9)  # [B, J]
        balance_kl = (p * (p.clamp(min=1e-9).log() + math.log(c.memory_slots))).sum(-1).mean()
        aux_loss = c.balance_loss_weight * balance_kl if c.balance_loss_weight > 0 and self.training else None
        metrics = {"write_gate": gate_mean, "novel_frac": novel_frac, "read_balance_kl": balance_kl.detach(),
                   "slots_used": (last_write >= 0).float().mean()}
        new_state = None
        if carried or use_cache:
            new_state = THLState(tiers, memory, read_ema, write_ema, last_read, last_write, fifo.float(), position)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, state=new_state, metrics=metrics)

    def flops_per_token(self, seq_len: int) -> float:
        """6·N over the parameters in matmuls, plus the per-token bank passes (read scores,
        novelty cosines, decay and write: about 4·J·Dm multiply-adds, ×3 for training)."""
        c = self.config
        n = self.num_parameters() - c.vocab_size * c.hidden_size
        bank = (c.read_heads + 3) * c.memory_slots * c.memory_dim
        local = c.local_window * (c.local_query_dim + c.hidden_size)
        return 6 * n + 6 * (bank + local)

