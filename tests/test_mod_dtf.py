"""MoD and DTF: the routing rules of docs/mod_dtf.md, the model contract, and a regression test
showing that the checks catch the reference implementation's leaks (rows packed into one
sequence, selected tokens kept in score order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.errors import ConfigError
from dynlm.infer.generate import generate_ids
from dynlm.models.base import DynModel
from dynlm.models.dtf import DTFModel, SurpriseGate
from dynlm.models.mod import ModModel
from dynlm.nn.routing import capacity_k, gather_tokens, scatter_add_tokens

VOCAB = 64
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64}
# (name, config): both causal routers of MoD, both DTF inits
VARIANTS = {
    "mod-aux_bce": {"type": "mod", "mod_capacity": 0.25},
    "mod-predictor": {"type": "mod", "mod_capacity": 0.25, "causal_router": "predictor", "router_scale": "linear"},
    "dtf-seed": {"type": "dtf", "dtf_capacity": 0.25},
    "dtf-paper": {"type": "dtf", "dtf_capacity": 0.25, "dtf_init": "paper"},
}


def make(variant: str = "mod-aux_bce", seed: int = 0, **overrides) -> DynModel:
    torch.manual_seed(seed)
    model = dynlm.build_model({**SMALL, **VARIANTS[variant], **overrides})
    for name, p in model.named_parameters():  # larger weights: routing decisions and surprises vary
        if p.dim() == 2 and "embed" not in name:
            torch.nn.init.normal_(p, std=0.15)
    return model


def tokens(b: int = 3, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The checks (also applied to the leaky variants below, which they must catch)


@torch.no_grad()
def cross_row_leak(model: DynModel, x: torch.Tensor) -> float:
    """Largest change of any logit of rows 1.. when only row 0 changes."""
    changed = x.clone()
    changed[0] = (changed[0] + 7) % VOCAB
    return (model(x).logits[1:] - model(changed).logits[1:]).abs().max().item()


@torch.no_grad()
def future_leak(model: DynModel, x: torch.Tensor, t: int, fixed_masks: bool) -> float:
    """Largest change of a logit at positions <= t when tokens after t change (in every row).
    With `fixed_masks`, both forwards route exactly as the first input did."""
    changed = x.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 5) % VOCAB
    if not fixed_masks:
        return (model(x).logits[:, : t + 1] - model(changed).logits[:, : t + 1]).abs().max().item()
    before = model(x).logits
    with model.fixed_routing(model.last_routing_masks):
        after = model(changed).logits
    return (before[:, : t + 1] - after[:, : t + 1]).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_mode_is_strictly_causal_and_row_independent(variant: str) -> None:
    model = make(variant).eval()
    x = tokens()
    assert model.routing_mode() == "causal"
    model(x)
    masks = model.last_routing_masks
    fractions = [m.float().mean().item() for m in masks.values()]
    assert all(0.05 < f < 0.95 for f in fractions), fractions  # the causal router really routes
    for t in (0, 6, 12):
        assert future_leak(model, x, t, fixed_masks=False) < 1e-5
    assert cross_row_leak(model, x) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_mode_is_causal_given_fixed_masks_and_row_independent(variant: str) -> None:
    model = make(variant).train()
    x = tokens()
    assert model.routing_mode() == "topk" and not model.causal_in_training
    for t in (3, 9):
        assert future_leak(model, x, t, fixed_masks=True) < 1e-5
    assert cross_row_leak(model, x) < 1e-5
    # without fixed masks top-k is not causal (it is by design): the check above is not vacuous
    assert future_leak(model, x, 3, fixed_masks=False) > 1e-4


class PackedLeakyMoD(ModModel):
    """The reference implementation's routed block: the selected tokens of every row packed into
    one sequence [1, B*k, C], kept in score order, under one causal mask."""

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(scores.detach(), k, dim=-1).indices  # score order, not position order

    def run_selected(self, block, x, idx, weight, cos, sin):
        b, k = idx.shape
        packed = gather_tokens(x, idx).reshape(1, b * k, -1)
        update = block(packed, cos[idx].reshape(1, b * k, -1), sin[idx].reshape(1, b * k, -1))
        return scatter_add_tokens(x, idx, weight.gather(1, idx).unsqueeze(-1) * update.view(b, k, -1))


class UnsortedMoD(ModModel):
    """Per-row routing, but the selected tokens stay in score order (rule 2 broken only)."""

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(scores.detach(), k, dim=-1).indices


class PackedSortedMoD(PackedLeakyMoD):
    """Position-sorted, but rows packed together (rule 1 broken only)."""

    select = ModModel.select


def leaky(cls: type[ModModel], seed: int = 0) -> ModModel:
    reference = make("mod-aux_bce", seed=seed, mod_capacity=0.5)
    model = cls(reference.config)
    model.load_state_dict(reference.state_dict())
    return model.train()


def test_checks_catch_the_reference_leaks() -> None:
    """Regression: each check fails the implementation that breaks its rule, and the correct
    implementation (same weights) passes both."""
    x = tokens(b=3, t=16)
    correct = leaky(ModModel)
    assert cross_row_leak(correct, x) < 1e-5 and future_leak(correct, x, 5, fixed_masks=True) < 1e-5

    packed = leaky(PackedLeakyMoD)
    assert cross_row_leak(packed, x) > 1e-3
    assert future_leak(packed, x, 5, fixed_masks=True) > 1e-3

    assert cross_row_leak(leaky(PackedSortedMoD), x) > 1e-3  # packing alone leaks across rows
    unsorted = leaky(UnsortedMoD)
    assert cross_row_leak(unsorted, x) < 1e-5  # per-row routing alone does not
    assert future_leak(unsorted, x, 5, fixed_masks=True) > 1e-3  # score order leaks the future


# ---------------------------------------------------------------------------------------------
# Routing rules


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("capacity", "seq_len"), [(0.125, 16), (0.125, 7), (0.3, 10), (1.0, 6)])
def test_capacity_is_honoured_in_training(variant: str, capacity: float, seq_len: int) -> None:
    key = "mod_capacity" if variant.startswith("mod") else "dtf_capacity"
    model = make(variant, **{key: capacity}).train()
    out = model(tokens(t=seq_len))
    masks = model.last_routing_masks
    k = capacity_k(capacity, seq_len)
    assert sorted(masks) == model.routed_layers
    for mask in masks.values():
        assert mask.sum(-1).tolist() == [k] * mask.shape[0]
    assert float(out.metrics["route/frac"]) == pytest.approx(k / seq_len)


def test_mod_raising_a_router_score_selects_the_token() -> None:
    model = make("mod-aux_bce").train()
    x = tokens(b=2, t=16)
    router = model.model.layers[1].router
    model(x)
    masks = model.last_routing_masks
    skipped = int((~masks[1][0]).nonzero()[0])
    selected = int(masks[1][0].nonzero()[0])

    def bump(module, inputs, output):
        output = output.clone()
        output[0, skipped] += 100.0
        output[0, selected] -= 100.0
        return output

    handle = router.register_forward_hook(bump)
    model(x)
    masks = model.last_routing_masks
    handle.remove()
    assert masks[1][0, skipped] and not masks[1][0, selected]


def test_dtf_gate_rises_with_static_surprise_and_falls_with_change_surprise() -> None:
    for init in ("seed", "paper"):
        gate = SurpriseGate(make(f"dtf-{init}").config)
        d_st = torch.tensor([[0.1, 0.5, 2.0]])
        d_ch = torch.full_like(d_st, 0.3)
        average = torch.full_like(d_st, 0.4)
        g = gate(d_st, d_ch, average)[2]
        assert torch.all(g[0, 1:] > g[0, :-1])  # more static surprise -> higher G
        g_ch = gate(torch.full_like(d_st, 0.5), torch.tensor([[0.1, 0.5, 2.0]]), average)[2]
        assert torch.all(g_ch[0, 1:] < g_ch[0, :-1])  # a worse prior (larger D_ch) -> lower CE -> lower G


def test_dtf_selects_the_most_surprising_token() -> None:
    """Reference bug 3 (negated score): the token whose decision block changed it most is routed."""
    model = make("dtf-seed", dtf_capacity=0.125).train()  # k = 2 of 16
    x = tokens(b=2, t=16)
    decision = model.model.layers[0]
    target = 11

    def amplify(module, inputs, output):
        output = output.clone()
        output[:, target] *= 30.0
        return output

    handle = decision.mlp.register_forward_hook(amplify)
    out = model(x)
    masks = model.last_routing_masks
    handle.remove()
    assert masks[1][:, target].all()
    assert out.metrics["dtf/D_st"] > 0


def test_mod_at_full_capacity_is_the_dense_block_times_the_router_scale() -> None:
    model = make("mod-aux_bce", mod_capacity=1.0).train()
    x = tokens(b=2, t=12)
    with torch.no_grad():
        routed = model(x).logits
        h = model.model.embed_tokens(x)
        cos, sin = model.rotary(torch.arange(x.shape[1]), h.dtype)
        for layer in model.model.layers:
            if layer.routed:
                h = h + torch.sigmoid(layer.router(h)) * layer(h, cos, sin)
            else:
                h = h + layer(h, cos, sin)
        dense = model.lm_head(model.model.norm(h))
    torch.testing.assert_close(routed, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gather_training_path_equals_masked_cache_path(variant: str) -> None:
    """The static-shape training path and the masked path (used with the KV cache) agree given
    the same routing."""
    model = make(variant).train()
    x = tokens()
    with torch.no_grad():
        gathered = model(x).logits
    masks = model.last_routing_masks
    model.eval().set_routing("topk")
    with torch.no_grad(), model.fixed_routing(masks):
        masked = model(x).logits
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-5)


def naive_run_selected(block, x, idx, weight, cos, sin):
    """The routed block by the definition, one row at a time with plain indexing: the row's
    selected tokens alone through the block (RoPE at their positions), the scaled update added
    at those positions. The reference of `gather_routed_update` (gather, block, scatter_add)."""
    rows = []
    for row in range(x.shape[0]):
        pos = idx[row]
        update = block(x[row : row + 1, pos], cos[pos], sin[pos])[0]  # [k, C]
        added = torch.zeros_like(x[row])
        added[pos] = (weight[row, pos, None] * update).to(x.dtype)
        rows.append(x[row] + added)
    return torch.stack(rows)


@pytest.mark.parametrize("variant", [*VARIANTS, "mod-all"])
def test_training_path_equals_the_naive_per_row_reference(variant: str) -> None:
    """Top-k training forward and backward of the whole model: logits, loss and every gradient
    equal (fp32) those of the same model whose routed blocks run row by row."""
    config = {"routed_layers": [1, 2, 3]} if variant == "mod-all" else {}
    model = make("mod-aux_bce" if variant == "mod-all" else variant, **config).train()
    reference = type(model)(model.config).train()
    reference.load_state_dict(model.state_dict())
    reference.run_selected = naive_run_selected
    x = tokens(b=3, t=16)
    results = []
    for m in (model, reference):
        out = m(x, labels=x)
        (out.loss + out.aux_loss).backward()
        results.append((out.logits, {name: p.grad for name, p in m.named_parameters() if p.grad is not None}))
    (logits, grads), (ref_logits, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", ["mod-aux_bce", "dtf-seed"])
def test_training_with_unequal_masks_has_finite_gradients(variant: str) -> None:
    """Training through the masked path: fixed masks whose rows select different numbers of
    tokens, some rows with no selected token before position 9 (their early tokens have no valid
    key but their own), and causal routing in training mode. Loss and every gradient are finite."""
    model = make(variant).train()
    x = tokens(b=3, t=16)
    masks = {}
    for i in model.routed_layers:
        mask = torch.zeros(3, 16, dtype=torch.bool)
        mask[0, [9, 12]] = True
        mask[1, 15] = True
        mask[2, ::2] = True
        masks[i] = mask
    with model.fixed_routing(masks):
        out = model(x, labels=x)
    model.set_routing("causal")
    causal = model(x, labels=x)
    for result in (out, causal):
        (result.loss + result.aux_loss).backward()
    assert torch.isfinite(out.loss) and torch.isfinite(causal.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# Decoding with the causal router


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_full_forward_in_causal_mode(variant: str) -> None:
    model = make(variant).eval()
    x = tokens(b=2, t=20)
    with torch.no_grad():
        full = model(x).logits
        state = model.init_state(2)
        steps = [model(x[:, :7], state=state).logits]
        steps += [model(x[:, i : i + 1], state=state).logits for i in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    for i in model.routed_layers:  # skipped tokens left no valid key in the routed layers' caches
        valid = state.layers[i].valid[:, :20]
        assert 0 < valid.sum() < valid.numel()


def test_decode_skips_a_layer_no_row_routes() -> None:
    model = make("mod-aux_bce").eval()
    x = tokens(b=1, t=24)
    calls = []
    layer = model.model.layers[1]
    handle = layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        full = model(x).logits
        calls.clear()
        state = model.init_state(1)
        steps = [model(x[:, i : i + 1], state=state).logits for i in range(24)]
        masks = model.last_routing_masks
    handle.remove()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    routed = int(state.layers[1].valid[0, :24].sum())
    assert 0 < routed < 24 and len(calls) == routed  # the block ran only for routed tokens
    assert masks[1].shape == (1, 1)


@pytest.mark.parametrize("variant", ["mod-aux_bce", "dtf-seed"])
def test_generate_ids_runs_with_the_causal_router(variant: str) -> None:
    """Greedy generation with the cache (causal router) gives the tokens of greedy decoding by
    full forwards over the growing sequence: 5 prompt + 6 new tokens, no EOS."""
    model = make(variant).eval()
    prompt = tokens(b=2, t=5)
    out = generate_ids(model, prompt, max_new_tokens=6, temperature=0.0)
    assert out.shape == (2, 11)
    reference = prompt
    with torch.no_grad():
        for _ in range(6):
            reference = torch.cat([reference, model(reference).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, reference)


# ---------------------------------------------------------------------------------------------
# Training signal, metrics, FLOPs


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_routers_priors_and_temperatures(variant: str) -> None:
    model = make(variant).train()
    x = tokens()
    out = model(x, labels=x)
    (out.loss + out.aux_loss).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []
    names = {n for n, _ in model.named_parameters()}
    if variant.startswith("dtf"):
        assert {"model.layers.1.gate.beta_ce", "model.layers.1.gate.beta_cu", "model.layers.1.gate.o_ce",
                "model.layers.1.gate.m_cu", "model.layers.0.prior.gate_proj.weight",
                "model.layers.1.causal_router.in_proj.weight"} <= names
    else:
        assert "model.layers.1.router.weight" in names


@pytest.mark.parametrize("variant", ["mod-aux_bce", "mod-predictor", "dtf-seed"])
def test_a_short_training_run_lowers_loss_and_trains_the_causal_router(variant: str) -> None:
    model = make(variant, seed=3).train()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else None
    x = tokens(b=4, t=32, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        out = model(x, labels=x)
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else (out.loss.item(), float(out.metrics["route/router_bce"]))
    assert out.loss.item() < first[0] - 1.0
    assert float(out.metrics["route/router_bce"]) < first[1]


def test_metrics_are_logged() -> None:
    out = make("dtf-seed").train()(tokens())
    for key in ("route/frac", "route/entropy", "route/causal_acc", "route/frac_L1", "route/frac_L3",
                "dtf/D_st", "dtf/D_ch", "dtf/S_CE", "dtf/S_CU", "dtf/G", "dtf/ce_share", "dtf/cu_share"):
        value = out.metrics[key]
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad, key
    assert float(out.metrics["dtf/ce_share"] + out.metrics["dtf/cu_share"]) == pytest.approx(1.0)
    assert 0.0 <= float(out.metrics["dtf/G"]) <= 1.0
    out = make("mod-predictor").train()(tokens())
    assert 0.0 <= float(out.metrics["route/causal_acc"]) <= 1.0 and out.aux_loss.item() > 0


def test_routing_statistics_follow_their_per_layer_definitions() -> None:
    """The statistics of all routed layers are computed in one batch: each equals the mean over
    routed layers of its per-layer definition, from the router logits each layer saw (MoD
    aux_bce: the causal logits are the router logits) and the mask it processed."""
    model = make("mod-aux_bce", routed_layers=[1, 2, 3]).train()
    logits = {}
    for i in model.routed_layers:
        model.model.layers[i].router.register_forward_hook(
            lambda module, args, out, i=i: logits.__setitem__(i, out.detach().squeeze(-1).float()))
    out = model(tokens(b=3, t=16))
    masks = model.last_routing_masks
    layers = model.routed_layers
    bce = [torch.nn.functional.binary_cross_entropy_with_logits(logits[i], masks[i].float()) for i in layers]
    p = [torch.sigmoid(logits[i]).clamp(1e-6, 1 - 1e-6) for i in layers]
    entropy = [-(q * q.log2() + (1 - q) * (1 - q).log2()).mean() for q in p]
    expected = {"route/router_bce": torch.stack(bce).mean(),
                "route/causal_acc": torch.stack([((logits[i] > 0) == masks[i]).float().mean() for i in layers]).mean(),
                "route/causal_frac": torch.stack([(logits[i] > 0).float().mean() for i in layers]).mean(),
                "route/entropy": torch.stack(entropy).mean(),
                **{f"route/frac_L{i}": masks[i].float().mean() for i in layers}}
    for key, value in expected.items():
        torch.testing.assert_close(out.metrics[key], value, atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(out.aux_loss, model.config.mod_aux_loss_weight * expected["route/router_bce"])


class HostSync(Exception):
    pass


@pytest.mark.parametrize("variant", ["mod-aux_bce", "mod-predictor", "dtf-seed"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_reads_nothing_back_from_the_device(variant: str, mode: str, monkeypatch) -> None:
    """A training or evaluation forward (top-k or causal routing, no cache) never reads a tensor
    on the host (`.item()`, `.tolist()`, `bool()`, `int()`, `float()`): each is a device sync and
    a graph break under torch.compile. Metrics stay tensors; the trainer reads them when it logs."""
    model = make(variant).train(mode == "train")
    x = tokens()

    def refuse(*args, **kwargs):
        raise HostSync

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    out = model(x, labels=x)
    monkeypatch.undo()
    assert out.metrics and out.aux_loss is not None
    with pytest.raises(HostSync):  # the check is live: a read is refused
        monkeypatch.setattr(torch.Tensor, "tolist", refuse)
        torch.zeros(2).tolist()


@pytest.mark.parametrize("arch", ["mod", "dtf"])
def test_flops_count_only_processed_tokens(arch: str) -> None:
    key = f"{arch}_capacity"
    seq = 64
    routed = make(f"{arch}-seed" if arch == "dtf" else "mod-aux_bce", **{key: 0.125})
    full = make(f"{arch}-seed" if arch == "dtf" else "mod-aux_bce", **{key: 1.0})
    dense = dynlm.build_model({**SMALL, "type": "standard"})
    assert routed.processed_fractions(seq) == [1.0, 0.125, 1.0, 0.125]
    extra = full.num_parameters() - dense.num_parameters()  # routers, priors, causal routers
    assert full.flops_per_token(seq) == pytest.approx(dense.flops_per_token(seq) + 6 * extra)
    layer = dense.model.layers[1]
    block = sum(p.numel() for p in layer.parameters())
    saved = 2 * (6 * block * 0.875 + 12 * 4 * 8 * seq * (1 - 0.125**2))
    assert full.flops_per_token(seq) - routed.flops_per_token(seq) == pytest.approx(saved)


# ---------------------------------------------------------------------------------------------
# Config, checkpoints, transfer


def test_configs_and_presets() -> None:
    from dynlm.config import model_config

    mod = model_config("mod-quick")
    assert (mod.type, mod.mod_capacity, mod.mod_aux_loss_weight) == ("mod", 0.125, 0.01)
    assert mod.routed_layer_indices() == [1, 3]
    dtf = model_config("dtf-0.5b")
    assert (dtf.type, dtf.num_layers, dtf.beta_ce_init, dtf.beta_cu_init, dtf.m_cu_init, dtf.o_ce_init) == (
        "dtf", 24, -0.5, -0.8, 1.2, 1.0)
    paper = model_config("dtf-tiny", dtf_init="paper")
    assert (paper.beta_ce_init, paper.beta_cu_init, paper.m_cu_init, paper.o_ce_init) == (-0.3, -0.6, 1.1, 1.025)
    assert model_config("dtf-tiny", dtf_init="paper", beta_ce_init=-0.1).beta_ce_init == -0.1
    assert model_config("dtf-tiny").prior_size == 16
    assert model_config("dtf-tiny", prior_factor=0.0625, hidden_size=40).prior_size == 4
    for bad in ({"type": "mod", "mod_capacity": 0.0}, {"type": "mod", "mod_capacity": 1.5},
                {"type": "mod", "causal_router": "psychic"}, {"type": "mod", "routed_layers": [9]},
                {"type": "dtf", "num_layers": 3}, {"type": "dtf", "dtf_init": "thesis"},
                {"type": "dtf", "o_ce_init": 0.0}, {"type": "mod", "mod_capacty": 0.1},
                {"type": "mod", "sliding_window": 8}):
        with pytest.raises(ConfigError):
            model_config({**SMALL, **bad})
    with pytest.raises(ConfigError):
        make().set_routing("greedy")


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant: str, tmp_path: Path) -> None:
    model = make(variant).eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = dynlm.load_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model) and loaded.config == model.config
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("arch", [ModModel, DTFModel])
def test_dense_weights_copy_into_routed_models(arch: type) -> None:
    """Transfer: every tensor of the dense model has the same name and shape in the routed
    model; only routers, priors, gates and causal routers are new."""
    dense = dynlm.build_model({**SMALL, "type": "standard"})
    routed = make("mod-aux_bce" if arch is ModModel else "dtf-seed")
    dense_state = dense.state_dict()
    routed_state = routed.state_dict()
    assert all(routed_state[k].shape == v.shape for k, v in dense_state.items())
    fresh = set(routed_state) - set(dense_state)
    assert fresh and all(any(s in k for s in ("router", "prior", "gate.")) for k in fresh)
    missing, unexpected = routed.load_state_dict(dense_state, strict=False)
    assert set(missing) == fresh and not unexpected


def test_seed_config_names_map_into_the_model_section() -> None:
    """`dynlm train scratch model.type=dtf model.size=0.5B dtf_capacity=0.125 beta_ce_init=-0.5`."""
    from dynlm.config import model_config
    from dynlm.train.config import load_run_config

    run = load_run_config("scratch", ["model.type=dtf", "model.size=0.5B", "dtf_capacity=0.25", "beta_ce_init=-0.4"])
    config = model_config(run.model)
    assert (config.type, config.num_layers, config.hidden_size) == ("dtf", 24, 896)
    assert (config.dtf_capacity, config.beta_ce_init, config.beta_cu_init) == (0.25, -0.4, -0.8)
    run = load_run_config("quick", ["model.type=mod", "mod_capacity=0.5", "mod_aux_loss_weight=0.1"])
    config = model_config(run.model)
    quick_width = model_config("standard-quick").hidden_size  # the routed model keeps the preset's body
    assert (config.mod_capacity, config.mod_aux_loss_weight, config.hidden_size) == (0.5, 0.1, quick_width)
    with pytest.raises(ConfigError):
        load_run_config("quick", ["model.size=7B"])
    with pytest.raises(ConfigError):  # an alias and its target both given
        load_run_config("quick", ["model.type=mod", "mod_capacity=0.5", "model.mod_capacity=0.25"])


def test_transfer_from_a_dense_model_copies_every_shared_tensor() -> None:
    from dynlm.checkpoint import model_state_dict
    from dynlm.train.run import transfer_weights

    dense = dynlm.build_model({**SMALL, "type": "standard"})
    for variant in ("mod-predictor", "dtf-seed"):
        routed = make(variant)
        report = transfer_weights(dense, routed)
        assert not report["skipped"] and sorted(report["copied"]) == sorted(model_state_dict(dense))
        assert report["fresh"] and all(any(s in k for s in ("router", "prior", "gate.")) for k in report["fresh"])
        assert torch.equal(routed.model.layers[1].mlp.up_proj.weight, dense.model.layers[1].mlp.up_proj.weight)


@pytest.mark.slow
def test_trainable_in_all_four_modes(tmp_path: Path) -> None:
    """quick, scratch, transfer (from a dense run) and custom (a YAML file), shrunk to seconds."""
    from dynlm.train.run import train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + "To be, or not to be, that is the question. " * 40)
    small = [f"data.corpus={corpus}", "data.seq_len=32", "train.batch_size=4", "train.max_steps=3",
             "train.warmup_steps=1", "train.eval_every=0", "train.eval_bytes=256", "train.final_eval=[]",
             "train.sample_prompt=null", "train.plot=false", "train.progress=false", f"out_dir={tmp_path / 'runs'}"]
    tiny = ["model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2", "model.intermediate_size=64"]

    def trained(run_dir: Path, arch: str) -> dynlm.models.base.DynModel:
        model = dynlm.load_pretrained(run_dir / "last")
        assert model.architecture == arch
        return model

    quick = train("quick", ["model.type=mod", "data.tokenizer=bytes", *tiny, *small])
    trained(quick, "mod")
    scratch = train("scratch", ["model.type=dtf", "model.preset=standard-tiny", "dtf_capacity=0.25",
                                "data.tokenizer=bytes", *tiny, *small])
    assert trained(scratch, "dtf").config.dtf_capacity == 0.25
    dense = train("quick", ["model.type=standard", "data.tokenizer=bytes", "run_name=dense", *tiny, *small])
    transfer = train("transfer", [f"init_from={dense / 'last'}", "model.type=mod", *small])
    report = json.loads((transfer / "transfer.json").read_text())
    assert report["copied"] and not report["skipped"]
    assert report["fresh"] == ["model.layers.1.router.weight", "model.layers.3.router.weight"]
    model = trained(transfer, "mod")
    source = dynlm.load_pretrained(dense / "last")
    # three AdamW steps at lr <= 1e-4 move a weight by < 1e-3; fresh weights would differ by ~0.03
    drift = (model.model.layers[0].mlp.up_proj.weight - source.model.layers[0].mlp.up_proj.weight).abs().max()
    assert drift < 1e-3
    custom = tmp_path / "custom.yaml"
    custom.write_text("preset: quick\nmodel:\n  type: dtf\n  dtf_init: paper\ndata:\n  tokenizer: bytes\n")
    model = trained(train(custom, [*tiny, *small]), "dtf")
    assert model.config.beta_ce_init == -0.3


@pytest.mark.parametrize(("vocab", "expected"), [(50304, {"mod": 0.674, "dtf": 0.696, "mod-all": 0.402}),
                                                 (258, {"mod": 0.553, "dtf": 0.583, "mod-all": 0.181})])
def test_flops_ratios_quoted_in_the_docs(vocab: int, expected: dict[str, float]) -> None:
    """docs/mod_dtf.md quotes these (gpt2-small-like body, seq 1024)."""
    variants = {"mod": {"type": "mod"}, "dtf": {"type": "dtf"},
                "mod-all": {"type": "mod", "routed_layers": list(range(1, 12))}}
    with torch.device("meta"):  # shapes only: no memory, no time
        dense = dynlm.build_model("gpt2-small-like", vocab_size=vocab).flops_per_token(1024)
        for name, overrides in variants.items():
            model = dynlm.build_model({"preset": "gpt2-small-like", "vocab_size": vocab, **overrides})
            assert model.flops_per_token(1024) / dense == pytest.approx(expected[name], abs=5e-4), name
