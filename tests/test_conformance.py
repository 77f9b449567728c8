"""The model contract (docs/architecture.md, "Conformance rules"), checked for every registered architecture.

A new architecture that registers itself and ships an `<arch>-tiny` preset is tested here
automatically."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.infer.generate import generate_ids
from dynlm.models.base import causal_lm_loss
from dynlm.models.dtf import DTFState
from dynlm.nn import KVCache

VOCAB = 97
# config options that change the computation enough to need the whole contract checked again:
# "<arch>+<variant>" builds <arch>-tiny with these overrides
VARIANTS = {"agiformer+halting": {"halting": True, "reasoning_steps": 3}}
ARCHITECTURES = dynlm.list_architectures() + list(VARIANTS)


def tiny(arch: str) -> dynlm.models.base.DynModel:
    torch.manual_seed(0)
    return dynlm.build_model(f"{arch.partition('+')[0]}-tiny", vocab_size=VOCAB, **VARIANTS.get(arch, {}))


def tokens(batch: int = 3, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def fixed_routing(model, x: torch.Tensor):
    """For architectures that route by a whole-sequence top-k in training: record the routing
    masks of one forward on `x` and replay them, so that causality can be checked given a fixed
    mask. Other architectures: a no-op."""
    if model.causal_in_training:
        return contextlib.nullcontext()
    with torch.no_grad():
        model(x)
    return model.fixed_routing(model.last_routing_masks)


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def test_every_architecture_has_a_tiny_preset(arch):
    assert f"{arch.partition('+')[0]}-tiny" in dynlm.list_presets()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_causal_and_rows_independent(arch, mode):
    model = tiny(arch)
    model.train(mode == "train")
    x = tokens()
    t = 11
    changed_future = x.clone()
    changed_future[:, t + 1:] = (changed_future[:, t + 1:] + 1) % VOCAB
    changed_row = x.clone()
    changed_row[1] = (changed_row[1] + 5) % VOCAB
    with fixed_routing(model, x), torch.no_grad():
        base = model(x).logits
        future = model(changed_future).logits
    # causality: positions <= t never see the changed future (given the routing, for routed models)
    torch.testing.assert_close(future[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=0)
    with torch.no_grad():
        base = model(x).logits
        other = model(changed_row).logits
    # nothing crosses batch rows, whatever the mode
    torch.testing.assert_close(other[[0, 2]], base[[0, 2]], atol=1e-5, rtol=0)
    assert (other[1] - base[1]).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_caching_is_explicit(arch, mode):
    """A plain forward returns no state in either mode; a state passed in is continued and
    returned (updated in place, like a KV cache, or as a new object, like a recurrent state);
    use_cache=True starts one and returns it. The plain forward's logits are the same
    as the cached one's."""
    model = tiny(arch).train(mode == "train")
    x = tokens(batch=2, length=10)
    with torch.no_grad():
        plain = model(x)
        assert plain.state is None
        cached = model(x, use_cache=True)
        assert cached.state is not None
        state = model.init_state(2)
        passed = model(x, state=state)
        assert passed.state is not None
    if mode == "eval":  # training routes by top-k over the sequence; the cached path by its mask
        torch.testing.assert_close(cached.logits, plain.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(passed.logits, plain.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the returned state continues the sequence
        more = model(x[:, :3], state=cached.state)
    assert more.state is not None


# chunk lengths fed one after another: a prefill, a second multi-token chunk while the cache is
# non-empty, single tokens, then another multi-token chunk
CHUNKS = (9, 4, 1, 1, 5)


def test_streaming_equivalence(arch):
    model = tiny(arch).eval()
    x = tokens(batch=2, length=sum(CHUNKS))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, : CHUNKS[0]], use_cache=True)
        pieces, start = [out.logits], CHUNKS[0]
        for n in CHUNKS[1:]:
            out = model(x[:, start: start + n], state=out.state)
            pieces.append(out.logits)
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_decode_with_state_matches_full_forward(arch):
    model = tiny(arch).eval()
    prompt = tokens(batch=2, length=7)
    ids = generate_ids(model, prompt, max_new_tokens=12)
    ref = prompt
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, ref)


def expected_state_nbytes(model, state, batch: int, consumed: int) -> int:
    """Bytes a state holds after `consumed` tokens, from the config: a KV cache keeps K and V of
    every layer for every position (fp32); DTF adds, per decision layer, the last <= ma_window
    static surprises (fp32)."""
    c = model.config
    if isinstance(state, KVCache):
        total = c.num_layers * 2 * batch * c.num_kv_heads * c.head_dim * consumed * 4
        if isinstance(state, DTFState):
            total += (c.num_layers // 2) * batch * min(consumed, c.ma_window) * 4
        return total
    raise AssertionError(f"no expected size for a {type(state).__name__} state")


def test_state_size(arch):
    model = tiny(arch).eval()
    with torch.no_grad():
        state = model.init_state(1)
        out = model(tokens(1, 8), state=state)
        small = model.state_nbytes(out.state)
        out = model(tokens(1, 40, seed=2), state=out.state)
        large = model.state_nbytes(out.state)
    if model.constant_state:
        assert small > 0 and large == small, "a recurrent state must not grow with the tokens consumed"
    else:
        assert small == expected_state_nbytes(model, out.state, 1, 8)
        assert large == expected_state_nbytes(model, out.state, 1, 48)


def test_save_load_round_trip(arch, tmp_path: Path):
    model = tiny(arch).eval()
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    # no executable or pickled content: only JSON and safetensors
    assert all(f.endswith((".json", ".safetensors")) for f in files), files
    loaded = dynlm.load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_label_convention(arch):
    model = tiny(arch).eval()
    x = tokens()
    labels = x.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(x, labels=labels)
    manual = causal_lm_loss(out.logits, labels)
    torch.testing.assert_close(out.loss, manual)
    assert out.logits.shape == (*x.shape, VOCAB)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)


def _total_loss(out) -> torch.Tensor:
    return out.loss if out.aux_loss is None else out.loss + out.aux_loss


def test_learns_on_a_fixed_batch(arch):
    model = tiny(arch).train()
    x = tokens(batch=2, length=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        out = model(x, labels=x)
        loss = _total_loss(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_gradients_reach_every_parameter(arch):
    model = tiny(arch).train()
    x = tokens(batch=4, length=32)
    _total_loss(model(x, labels=x)).backward()
    dead = [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead, f"no gradient reaches: {dead}"
