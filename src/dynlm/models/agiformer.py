"""AGIFORMER: a byte-level language model over patches, with hybrid sliding-window + decayed
linear attention, recurrent refinement and a GRU byte head.

Bytes x_0 .. x_{T-1} (ids < vocab_size), patch size P, encoder overlap o:

    patch n        = bytes nP .. nP+P-1; its encoder window also sees the o bytes before it
    e_n            = RMSNorm(W_enc [emb(x_{nP-o}); ...; emb(x_{nP+P-1})])    (a strided Conv1d)
    HybridBlock    x += W_o(g * SWA_w(n) + (1 - g) * Memory_alpha(n)),  n = RMSNorm(x),
                   g = sigmoid(W_g n);  x += SwiGLU(RMSNorm(x))              over patches, RoPE
    Refinement     z += sigmoid(W_r m) * SwiGLU(m), m = RMSNorm(z)          `reasoning_steps` times
                   (optional ACT halting: see `AgiformerModel.refine`)
    h_n            = RMSNorm(z_n): sees bytes 0 .. nP+P-1 (patches 0..n), never a later one

Byte head: the bytes of patch n are decoded by a GRU conditioned on c_n = h_{n-1} (c_0 a learned
start vector), i.e. on complete earlier patches only. Its inputs are "slots": slot s = nP + j
(j = 0..P-1) reads byte x_{s-1} (slot 0 reads nothing) with [emb(x_{s-1}); W_c c_n] and its
output predicts byte x_s. In the Hugging Face convention logits[t] predict x_{t+1}, so
logits[t] = head(slot t+1): it depends on bytes 0..t only (the perturbation test proves it).

State for streaming (`AgiformerState`, constant size): bytes consumed, the last o + P - 1 bytes
(the next patch's encoder window), each layer's last w - 1 keys/values and memory matrix, the
current patch's condition c_n and the GRU hidden state. Feeding bytes one at a time, across
patch boundaries, gives the logits of one full forward.

Plasticity alpha (0, 1] scales every memory decay: `config.plasticity`, saved with the
checkpoint, set by the curriculum through `set_plasticity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.base import DynModel, ModelOutput, causal_lm_loss
from dynlm.nn import RMSNorm, RotaryEmbedding, SwiGLU
from dynlm.nn.linear_attention import DecayedLinearMemory, check_plasticity
from dynlm.nn.sliding_window import SlidingWindowAttention, WindowHistory
from dynlm.registry import register


@dataclass
class AgiformerConfig(ModelConfig):
    type: str = "agiformer"
    # byte models need the byte tokenizer; the run config reads this (train/config.py)
    byte_level: ClassVar[bool] = True
    vocab_size: int = 320  # 256 bytes + the byte tokenizer's specials, rounded up to 64
    patch_size: int = 4  # bytes per patch
    patch_overlap: int = 2  # bytes of the previous patch each patch's encoder also reads
    sliding_window: int | None = 32  # patches each position attends to (itself included)
    reasoning_steps: int = 3  # refinement steps (shared weights)
    plasticity: float = 1.0  # alpha: scales every memory decay, in (0, 1]
    min_decay: float = 0.9  # lambda_min of the data-dependent decay
    init_decay: float = 0.998  # lambda at initialisation (alpha = 1)
    linear_chunk_size: int = 64  # chunk length of the chunked linear attention
    # adaptive computation time over the refinement steps (per patch position; off: always all steps)
    halting: bool = False
    halting_epsilon: float = 0.01  # a position halts once its halting probabilities sum to >= 1 - eps
    ponder_cost: float = 0.01  # weight of the ponder cost (steps + remainder) in aux_loss

    def validate(self) -> None:
        super().validate()
        if self.patch_size < 1 or self.patch_overlap < 0:
            raise ConfigError(f"model.patch_size must be >= 1 and model.patch_overlap >= 0, got "
                              f"{self.patch_size} and {self.patch_overlap}")
        if self.sliding_window is None:
            raise ConfigError("model.sliding_window must be set for agiformer (patches attended to)")
        if self.num_kv_heads != self.num_heads:
            raise ConfigError(f"agiformer uses full multi-head attention: model.num_kv_heads "
                              f"({self.num_kv_heads}) must equal model.num_heads ({self.num_heads})")
        if self.reasoning_steps < 0:
            raise ConfigError(f"model.reasoning_steps must be >= 0, got {self.reasoning_steps}")
        if self.halting and self.reasoning_steps < 1:
            raise ConfigError("model.halting needs model.reasoning_steps >= 1 (it halts among those steps)")
        if not 0.0 < self.halting_epsilon < 1.0:
            raise ConfigError(f"model.halting_epsilon must be in (0, 1), got {self.halting_epsilon}")
        if self.ponder_cost < 0:
            raise ConfigError(f"model.ponder_cost must be >= 0, got {self.ponder_cost}")
        if self.linear_chunk_size < 1:
            raise ConfigError(f"model.linear_chunk_size must be >= 1, got {self.linear_chunk_size}")
        try:
            check_plasticity(self.plasticity)
        except ConfigError as e:
            raise ConfigError(f"model.plasticity: {e.message}") from None

    def check_sequence_length(self, seq_len: int) -> None:
        """Training sequences must be whole patches, and at least one attention window long
        (a longer window would never be trained)."""
        if seq_len % self.patch_size:
            raise ConfigError(f"model.patch_size ({self.patch_size}) does not divide data.seq_len ({seq_len})",
                              f"use a multiple of {self.patch_size}, e.g. {seq_len - seq_len % self.patch_size}")
        if self.sliding_window * self.patch_size > seq_len:
            raise ConfigError(f"model.sliding_window ({self.sliding_window} patches = "
                              f"{self.sliding_window * self.patch_size} bytes) is longer than data.seq_len "
                              f"({seq_len} bytes)", "lower model.sliding_window or raise data.seq_len")


# ---------------------------------------------------------------------------------------------
# Blocks


class PatchEncoder(nn.Module):
    """Bytes -> one latent per complete patch: a strided linear map over o + P byte embeddings
    (the o bytes before the patch and its own P), then RMSNorm."""

    def __init__(self, config: AgiformerConfig, embed: nn.Embedding):
        super().__init__()
        self.patch, self.overlap = config.patch_size, config.patch_overlap
        self.embed = embed  # shared with the byte head
        self.proj = nn.Linear((self.patch + self.overlap) * config.hidden_size, config.hidden_size, bias=False)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, window_ids: torch.Tensor) -> torch.Tensor:
        """window_ids [B, o + N*P]: o bytes of left context (-1 = before the text) then N patches
        -> latents [B, N, C]."""
        emb = self.embed(window_ids.clamp(min=0)) * (window_ids >= 0).unsqueeze(-1)  # [B, o+NP, C]
        windows = emb.unfold(1, self.patch + self.overlap, self.patch)  # [B, N, C, o+P]
        windows = windows.transpose(-1, -2).flatten(2)  # [B, N, (o+P)*C]
        return self.norm(self.proj(windows))


@dataclass
class LayerState:
    window: WindowHistory  # last w-1 keys/values of the sliding-window attention
    memory: torch.Tensor | None  # [B, H, E, E+1] fp32 (S and z), None before the first patch


class HybridBlock(nn.Module):
    """x += W_o(g * SWA(n) + (1 - g) * Memory(n)); x += SwiGLU(RMSNorm(x)), n = RMSNorm(x)."""

    def __init__(self, config: AgiformerConfig):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = SlidingWindowAttention(c.hidden_size, c.num_heads, c.head_dim, c.sliding_window)
        self.memory = DecayedLinearMemory(c.hidden_size, c.num_heads, c.head_dim, c.min_decay, c.init_decay,
                                          c.linear_chunk_size)
        self.gate = nn.Linear(c.hidden_size, 1)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, alpha: float,
                state: LayerState | None) -> tuple[torch.Tensor, LayerState | None, torch.Tensor]:
        """x [B, N, C] -> (x, new state or None, mean gate [] for the metrics)."""
        n = self.input_layernorm(x)
        a, window = self.self_attn(n, cos, sin, None if state is None else state.window)  # [B, N, H*E]
        m, memory = self.memory(n, alpha, None if state is None else state.memory)  # [B, N, H*E]
        g = torch.sigmoid(self.gate(n))  # [B, N, 1]
        x = x + self.o_proj(g * a + (1 - g) * m)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, None if state is None else LayerState(window, memory), g.detach().float().mean()


class RefinementBlock(nn.Module):
    """z += sigmoid(W_r m) * SwiGLU(m), m = RMSNorm(z): one step of recurrent refinement, applied
    `reasoning_steps` times with the same weights. Position-wise, so causal by construction."""

    def __init__(self, config: AgiformerConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        m = self.norm(z)
        return z + torch.sigmoid(self.gate_proj(m)) * self.mlp(m)


class ByteHead(nn.Module):
    """GRU over the P slots of a patch, conditioned on that patch's c_n (see the module
    docstring). Hidden size = hidden_size; logits through `lm_head`."""

    def __init__(self, config: AgiformerConfig, embed: nn.Embedding):
        super().__init__()
        d = config.hidden_size
        self.embed = embed
        self.cond_proj = nn.Linear(d, d)
        self.init_proj = nn.Linear(d, d)
        self.cell = nn.GRUCell(2 * d, d)
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def initial_hidden(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.init_proj(cond))

    def forward(self, slot_ids: torch.Tensor, active: torch.Tensor, conds: torch.Tensor,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slot_ids [B, G, P]: the byte each slot reads (-1 = none); active [G, P] bool: slots to
        run (the others keep the hidden state); conds [B, G, C]; hidden [B, G, C] at each group's
        start. Returns (outputs [B, G, P, C], hidden [B, G, C] after the last active slot)."""
        b, g, p = slot_ids.shape
        emb = self.embed(slot_ids.clamp(min=0)) * (slot_ids >= 0).unsqueeze(-1)  # [B, G, P, C]
        cond = self.cond_proj(conds)  # [B, G, C]
        h = hidden.reshape(b * g, -1).float()
        outputs = []
        for j in range(p):  # P steps (4), each batched over every patch of every row
            inp = torch.cat([emb[:, :, j], cond], dim=-1).reshape(b * g, -1)
            new = self.cell(inp, h.to(inp.dtype))
            h = torch.where(active[:, j].repeat(b).unsqueeze(-1), new.float(), h)  # the hidden stays fp32
            outputs.append(h)
        out = torch.stack(outputs, dim=1).view(b, g, p, -1).to(emb.dtype)  # the weights' dtype for the LM head
        return self.norm(out), h.view(b, g, -1)


@dataclass
class AgiformerState:
    """Everything needed to continue a byte stream (sizes do not grow with the bytes consumed)."""

    position: int  # bytes consumed
    recent: torch.Tensor  # [B, o + P - 1] the last bytes (-1 = before the text)
    layers: list[LayerState] = field(default_factory=list)
    cond: torch.Tensor | None = None  # [B, C] condition of the patch being decoded
    hidden: torch.Tensor | None = None  # [B, C] GRU hidden after the last byte

    def nbytes(self) -> int:
        total = self.recent.numel() * self.recent.element_size()
        for layer in self.layers:
            total += layer.window.nbytes()
            if layer.memory is not None:
                total += layer.memory.numel() * layer.memory.element_size()
        for t in (self.cond, self.hidden):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


# ---------------------------------------------------------------------------------------------
# Model


class AgiformerBody(nn.Module):
    """Everything but the LM head: `model.*` in checkpoint names, like the transformers."""

    def __init__(self, config: AgiformerConfig):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.encoder = PatchEncoder(c, self.embed_tokens)
        self.layers = nn.ModuleList(HybridBlock(c) for _ in range(c.num_layers))
        self.refine = RefinementBlock(c)
        # halting probability of each position after each refinement step (only with halting)
        self.halt = nn.Linear(c.hidden_size, 1) if c.halting else None
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.start = nn.Parameter(torch.zeros(c.hidden_size))  # c_0: the condition of patch 0
        self.head = ByteHead(c, self.embed_tokens)


@register("agiformer", AgiformerConfig)
class AgiformerModel(DynModel):
    constant_state = True

    def __init__(self, config: AgiformerConfig):
        super().__init__(config)
        c = config
        self.model = AgiformerBody(c)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.init_weights()
        for layer in self.model.layers:
            layer.memory.reset_decay_bias()
        nn.init.normal_(self.model.start, std=c.initializer_range)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def plasticity(self) -> float:
        return self.config.plasticity

    def set_plasticity(self, alpha: float) -> None:
        """Set alpha for every memory; it is part of the config, so checkpoints record it."""
        self.config.plasticity = check_plasticity(alpha)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, max_length: int = 0) -> AgiformerState:
        c = self.config
        device = device if device is not None else self.model.start.device
        dtype = dtype or self.model.start.dtype
        recent = torch.full((batch_size, c.patch_overlap + c.patch_size - 1), -1, dtype=torch.long, device=device)
        layers = [LayerState(WindowHistory.empty(batch_size, c.num_heads, c.sliding_window, c.head_dim, device, dtype),
                             torch.zeros(batch_size, c.num_heads, c.head_dim, c.head_dim + 1, device=device))
                  for _ in range(c.num_layers)]
        return AgiformerState(0, recent, layers)

    def encode_patches(self, window_ids: torch.Tensor, first_patch: int,
                       layer_states: list[LayerState] | None) -> tuple[torch.Tensor, list[LayerState] | None,
                                                                       dict[str, torch.Tensor]]:
        """window_ids [B, o + N*P] -> h [B, N, C], the latents of N complete patches whose first
        is patch number `first_patch` (RoPE position)."""
        x = self.model.encoder(window_ids)  # [B, N, C]
        positions = torch.arange(first_patch, first_patch + x.shape[1], device=x.device)
        cos, sin = self.rotary(positions, x.dtype)
        new_states: list[LayerState] | None = None if layer_states is None else []
        gates = []
        for i, layer in enumerate(self.model.layers):
            x, layer_state, gate = layer(x, cos, sin, self.config.plasticity,
                                         None if layer_states is None else layer_states[i])
            gates.append(gate)
            if new_states is not None:
                new_states.append(layer_state)
        x, metrics = self.refine(x)
        metrics["gate_attention"] = torch.stack(gates).mean()
        return self.model.norm(x), new_states, metrics

    def refine(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The refinement steps on x [B, N, C]. Without halting: `reasoning_steps` steps for every
        position. With halting (ACT, Graves 2016), per position n and step s = 1..S:

            z_s = refine(z_{s-1}), h_s = sigmoid(W_h z_s)   (h_S = 1: the last step always halts)
            N   = the first s with h_1 + ... + h_s >= 1 - eps;  R = 1 - (h_1 + ... + h_{N-1})
            out = sum_{s<N} h_s z_s + R z_N,   ponder = N + R  (its gradient flows through R)

        A halted position's state no longer changes and its output is fixed. Everything is
        position-wise, so a position's halting depends only on its own latent (which sees itself
        and the past): causal, and the same whether patches arrive at once or one by one. All
        positions run the S steps as one batch (no host sync to stop early); halting decides the
        output and the cost, not the wall time."""
        c = self.config
        metrics: dict[str, torch.Tensor] = {}
        if not c.halting:
            for step in range(c.reasoning_steps):
                z = self.model.refine(x)
                metrics[f"refine_update_{step}"] = (z - x).detach().float().norm(dim=-1).mean()
                x = z
            return x, metrics
        threshold = 1.0 - c.halting_epsilon
        cumulative = x.new_zeros(*x.shape[:-1], 1, dtype=torch.float32)  # [B, N, 1] sum of h so far
        running = torch.ones_like(cumulative, dtype=torch.bool)
        out = torch.zeros_like(x, dtype=torch.float32)
        steps = torch.zeros_like(cumulative)  # N per position
        remainder = torch.zeros_like(cumulative)  # R per position
        z = x
        for step in range(c.reasoning_steps):
            new = self.model.refine(z)
            metrics[f"refine_update_{step}"] = ((new - z).detach().float().norm(dim=-1, keepdim=True)
                                                * running).sum() / running.sum().clamp(min=1)
            z = torch.where(running, new, z)  # halted positions keep their state
            if step == c.reasoning_steps - 1:
                h = torch.ones_like(cumulative)
            else:
                h = torch.sigmoid(self.model.halt(z).float())  # [B, N, 1]
            halts = running & (cumulative + h >= threshold)
            weight = torch.where(halts, 1.0 - cumulative, torch.where(running, h, 0.0))
            out = out + weight * z.float()
            steps = steps + running.float()
            remainder = torch.where(halts, 1.0 - cumulative, remainder)
            cumulative = torch.where(running, cumulative + h, cumulative)
            running = running & ~halts
        ponder = (steps + remainder).mean()
        metrics["ponder_steps"] = steps.mean()
        metrics["ponder_aux_loss"] = c.ponder_cost * ponder
        return out.to(x.dtype), metrics

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: AgiformerState | None = None, use_cache: bool = False) -> ModelOutput:
        b, t = input_ids.shape
        c = self.config
        p, o = c.patch_size, c.patch_overlap
        keep_state = state is not None or use_cache
        # a plain forward starts from nothing and allocates no state
        start_state = state if state is not None else (self.init_state(b, device=input_ids.device) if use_cache
                                                       else None)
        pos = 0 if start_state is None else start_state.position
        if start_state is None:
            recent = torch.full((b, o + p - 1), -1, dtype=torch.long, device=input_ids.device)
        else:
            recent = start_state.recent
        r = pos % p  # bytes of the current, incomplete patch already consumed
        stream = torch.cat([recent, input_ids], dim=1)  # bytes pos-(o+P-1) .. pos+T-1
        aligned = stream[:, p - 1 - r:]  # from byte pos-r-o: o bytes of context, then whole patches
        num_new = (r + t) // p
        window_ids = aligned[:, : o + num_new * p]
        metrics: dict[str, torch.Tensor] = {}
        if num_new > 0:
            latents, layer_states, metrics = self.encode_patches(
                window_ids, pos // p, None if start_state is None else start_state.layers)
        else:
            latents = input_ids.new_zeros(b, 0, c.hidden_size, dtype=self.model.start.dtype)
            layer_states = None if start_state is None else start_state.layers

        # byte head: groups g0 .. g1 of P slots; slot s reads byte s-1 and predicts byte s
        first_slot = 0 if pos == 0 else pos + 1
        g0, g1 = first_slot // p, (pos + t) // p
        carried = g0 * p < first_slot  # the first group started in an earlier call
        conds = [self.model.start.expand(b, 1, -1)] if pos == 0 else []
        if carried:
            conds.append(start_state.cond.unsqueeze(1))
        conds = torch.cat([*conds, latents.to(self.model.start.dtype)], dim=1)  # [B, G, C]
        groups = g1 - g0 + 1
        hidden = self.model.head.initial_hidden(conds)  # [B, G, C]
        if carried:
            hidden = torch.cat([start_state.hidden.unsqueeze(1).to(hidden.dtype), hidden[:, 1:]], dim=1)
        slots = torch.arange(g0 * p, (g1 + 1) * p, device=input_ids.device)  # [G*P]
        active = (slots >= first_slot) & (slots <= pos + t)
        # byte read by slot s is x_{s-1}: index s-1-pos into input_ids, -1 for slot 0
        read = (slots - 1 - pos).clamp(0, t - 1)
        slot_ids = torch.where((slots >= 1) & active, input_ids[:, read], -1).view(b, groups, p)
        out, last_hidden = self.model.head(slot_ids, active.view(groups, p), conds, hidden)
        out = out.flatten(1, 2)  # [B, G*P, C]
        first_logit_slot = pos + 1 - g0 * p
        logits = self.lm_head(out[:, first_logit_slot:first_logit_slot + t])  # [B, T, V]

        new_state = None
        if keep_state:
            new_state = AgiformerState(pos + t, stream[:, stream.shape[1] - (o + p - 1):], layer_states,
                                       conds[:, -1], last_hidden[:, -1])
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        metrics["plasticity"] = torch.tensor(c.plasticity)
        aux_loss = metrics.pop("ponder_aux_loss", None)
        if aux_loss is not None:
            metrics["ponder_cost"] = aux_loss.detach()
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, state=new_state, metrics=metrics)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per byte: 6 * (matmul parameters used per byte) + attention terms.
        The backbone and refinement run once per patch, the head and encoder once per byte."""
        c = self.config
        body = self.model
        refine = sum(p.numel() for p in body.refine.parameters())
        backbone = sum(p.numel() for p in body.layers.parameters()) + c.reasoning_steps * refine
        per_byte = sum(p.numel() for p in body.head.parameters() if p is not body.embed_tokens.weight)
        per_byte += c.vocab_size * c.hidden_size + body.encoder.proj.weight.numel() / c.patch_size
        attention = 12 * c.num_layers * c.num_heads * c.head_dim * min(c.sliding_window, seq_len // c.patch_size)
        return 6 * (backbone / c.patch_size + per_byte) + attention / c.patch_size
