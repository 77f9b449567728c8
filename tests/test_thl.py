"""THL: its blocks against naive references, the spec's equations where a fault was found in the
reference (η, noise only on the choice), truncated BPTT through the trainer, the Python API."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.data.tokenizers import ByteTokenizer
from dynlm.errors import ConfigError
from dynlm.models.thl import THLModel, THLState
from dynlm.nn.local_attention import FifoAttention, fifo_attention_reference
from dynlm.nn.recurrent import GRUCell
from dynlm.nn.slot_memory import clip_norm, gumbel_noise, sparse_topk_read, sparse_topk_read_reference
from dynlm.train.trainer import TrainStep

VOCAB = 97


def tiny(**overrides) -> THLModel:
    torch.manual_seed(0)
    return dynlm.build_model("thl-tiny", vocab_size=VOCAB, **overrides)


def test_gru_cell_matches_torch():
    ref = torch.nn.GRUCell(6, 8)
    cell = GRUCell(8)
    with torch.no_grad():
        cell.hidden_proj.weight.copy_(ref.weight_hh)
        cell.hidden_proj.bias.copy_(ref.bias_hh)
    x, h = torch.randn(3, 6), torch.randn(3, 8)
    gates = torch.nn.functional.linear(x, ref.weight_ih, ref.bias_ih)
    torch.testing.assert_close(cell(gates, h), ref(x, h))


def test_fifo_attention_matches_reference_whole_and_streamed():
    torch.manual_seed(0)
    attn = FifoAttention(8, 4, 8, window=3)
    x = torch.randn(2, 9, 8)
    ref = fifo_attention_reference(attn, x)
    fifo, pos = torch.zeros(2, 3, 8), torch.tensor(0)
    whole, _ = attn(x, fifo, pos)
    torch.testing.assert_close(whole, ref)
    pieces = []
    for a, b in [(0, 4), (4, 5), (5, 9)]:
        out, fifo = attn(x[:, a:b], fifo, pos)
        pieces.append(out)
        pos = pos + (b - a)
    torch.testing.assert_close(torch.cat(pieces, 1), ref)
    assert whole[:, 0].abs().max() == 0  # nothing before the first token


@pytest.mark.parametrize("start", [0, 2, 50])
@pytest.mark.parametrize("t", [6, 17])
def test_fifo_attention_in_blocks_equals_all_keys_at_once(start, t, monkeypatch):
    """A piece longer than the window is attended in blocks of W queries (O(T*W)); the result and
    the gradients equal scoring all W + T keys at once (the form pieces of at most W tokens use),
    from any start position, with a FIFO of real earlier inputs."""
    torch.manual_seed(0)
    attn = FifoAttention(8, 4, 8, window=5).double()
    x = torch.randn(2, t, 8, dtype=torch.float64, requires_grad=True)
    fifo = torch.randn(2, 5, 8, dtype=torch.float64)
    fifo[:, : max(0, 5 - start)] = 0  # entries before position 0 are zeros
    position = torch.tensor(start)
    calls = []
    monkeypatch.setattr(attn, "_blocked", lambda *args: calls.append(1) or FifoAttention._blocked(attn, *args))
    blocked, _ = attn(x, fifo, position)
    assert calls == [1]  # t > W: the blocked form ran
    keys_in = torch.cat([fifo, x], dim=1)
    q, k, v = attn.q_proj(x), attn.k_proj(keys_in), attn.v_proj(keys_in)
    query, key = torch.arange(t)[:, None], torch.arange(5 + t)[None, :]
    mask = (key >= query) & (key < query + 5) & (key >= 5 - position)
    whole = attn._attend(q, k, v, mask)
    torch.testing.assert_close(blocked, whole)
    grads = torch.autograd.grad(blocked.square().sum(), [x, *attn.parameters()])
    ref_grads = torch.autograd.grad(whole.square().sum(), [x, *attn.parameters()])
    for got, expected in zip(grads, ref_grads):  # scores and softmax run in fp32 whatever the input dtype
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    if start == 0:
        assert blocked[:, 0].abs().max() == 0  # nothing before the first token


@pytest.mark.parametrize("with_noise", [False, True])
def test_sparse_read_matches_reference(with_noise):
    torch.manual_seed(0)
    q, memory, load = torch.randn(2, 3, 5), torch.randn(2, 7, 5), torch.rand(2, 7)
    noise = gumbel_noise((2, 3, 7), torch.device("cpu")) if with_noise else None
    read, slots, alpha = sparse_topk_read(q, memory, load, 0.1, 2, noise)
    torch.testing.assert_close(read, sparse_topk_read_reference(q, memory, load, 0.1, 2, noise), atol=1e-5, rtol=1e-5)
    # the noise changes which slots are read, never their weights: α is the clean scores' softmax
    clean = torch.einsum("bhm,bjm->bhj", q, memory) - 0.1 * load[:, None]
    torch.testing.assert_close(alpha, torch.softmax(clean.gather(-1, slots), -1))


def test_clip_norm():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(clip_norm(x, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_write_rate_is_applied():
    """After the first token the bank holds one slot (the first empty one) = η·g·w, |w| <= 1."""
    model = tiny(memory_decay=1.0).eval()
    c = model.config
    with torch.no_grad():
        out = model(torch.tensor([[5]]), state=model.init_state(1))
        mem = out.state.memory[0]
        written = mem.norm(dim=-1) > 0
        assert written.tolist() == [True] + [False] * (c.memory_slots - 1)
        s = out.state.tiers[:, 0]
        w = clip_norm(model.writer.write_proj(torch.cat([s[0], s[-1]])), c.write_clip)
        gate = torch.sigmoid(torch.tensor(c.novelty_beta * (1.0 - c.novelty_theta)))  # empty bank: novelty 1
        torch.testing.assert_close(mem[0], c.write_rate * gate * w)
        assert out.state.last_write[0, 0] == 0 and out.state.position == 1


def test_tiers_update_on_their_period():
    model = tiny(tier_periods=[1, 2, 4]).eval()
    with torch.no_grad():
        state = model.init_state(1)
        history = []
        for token in [3, 1, 4, 1, 5, 9, 2, 6]:
            state = model(torch.tensor([[token]]), state=state).state
            history.append(state.tiers[:, 0].clone())
    for t in range(1, 8):
        changed = [not torch.equal(history[t][k], history[t - 1][k]) for k in range(3)]
        assert changed == [True, t % 2 == 0, t % 4 == 0], (t, changed)


def test_read_noise_is_causal_and_only_in_training():
    model = tiny(read_noise=1.0).train()
    x = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    outs = []
    for inp in (x, changed, x):
        model.noise_generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            outs.append(model(inp).logits)
    torch.testing.assert_close(outs[1][:, :9], outs[0][:, :9])
    model.noise_generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        other_noise = model(x).logits
    assert (other_noise - outs[0]).abs().max() > 1e-6  # the noise does change the choice in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits)


def test_state_is_fixed_size_and_fp32():
    model = tiny().eval()
    with torch.no_grad():
        state = model.init_state(2)
        sizes = []
        for n in (1, 9, 30):
            state = model(torch.randint(0, VOCAB, (2, n)), state=state).state
            sizes.append(state.nbytes())
    assert sizes[0] == sizes[1] == sizes[2]
    assert state.memory.dtype == state.tiers.dtype == torch.float32


def test_plain_forward_returns_no_state_unless_asked():
    model = tiny().eval()
    x = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        assert model(x).state is None
        assert isinstance(model(x, use_cache=True).state, THLState)


def test_balance_loss_in_aux_loss_behind_its_flag():
    x = torch.randint(0, VOCAB, (2, 16))
    assert tiny().train()(x, labels=x).aux_loss is None
    out = tiny(balance_loss_weight=0.5).train()(x, labels=x)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, 0.5 * out.metrics["read_balance_kl"])


def test_truncated_bptt_gives_the_full_sequence_loss():
    """The trainer's chunked step reports the same loss as one forward over the sequence, and its
    gradients equal full backpropagation when the chunk covers the sequence."""
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    full = tiny(bptt_chunk=0).train()
    with torch.no_grad():
        reference = full(x, labels=x).loss
    chunked = tiny(bptt_chunk=5).train()
    opt = torch.optim.SGD(chunked.parameters(), lr=0.0)
    step = TrainStep(chunked, chunked, opt, torch.device("cpu"), torch.float32, clip=0.0)
    out = step([x])
    torch.testing.assert_close(out.loss, reference)

    whole = tiny(bptt_chunk=12).train()
    loss = whole(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in whole.named_parameters()}
    one_chunk = tiny(bptt_chunk=12).train()
    step = TrainStep(one_chunk, one_chunk, torch.optim.SGD(one_chunk.parameters(), lr=0.0), torch.device("cpu"),
                     torch.float32, clip=0.0)
    step.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare
    step([x])
    for name, p in one_chunk.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_whole_sequence_gradients_equal_token_by_token_backprop():
    """float64: one forward over the sequence and T one-token forwards with the state carried (not
    detached) give the same logits and the same parameter gradients: the per-token inputs
    precomputed for the whole sequence are routed to, and their gradients back from, the right step."""
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    grads, logits = [], []
    for whole in (True, False):
        model = tiny(read_noise=0.0, bptt_chunk=0).double().train()
        if whole:
            out = model(x).logits
        else:
            state, pieces = model.init_state(2), []
            for i in range(x.shape[1]):
                o = model(x[:, i:i + 1], state=state)
                state, pieces = o.state, pieces + [o.logits]
            out = torch.cat(pieces, dim=1)
        out.pow(2).mean().backward()
        logits.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # the carried state (tiers, bank, FIFO) is fp32 by design: float64 elsewhere, so fp32 tolerances
    torch.testing.assert_close(logits[0], logits[1], atol=1e-7, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "reader.query_e.weight" in grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-7, rtol=1e-5, msg=name)


def test_compiled_step_sees_one_input_signature_while_training():
    """With compile_step, every step of a training forward (the first included, whose state comes
    from zeros or a detached carry) gets tiers and memory that require grad: torch.compile then
    builds one graph for the step instead of a second one for the first token (the step function is
    replaced by a recorder here, so nothing is compiled)."""
    model = tiny(compile_step=True, bptt_chunk=0).train()
    seen = []

    def recorder(*args):
        seen.append((args[4].requires_grad, args[5].requires_grad))
        return model.step(*args)

    model._step_fn = recorder
    x = torch.randint(0, VOCAB, (2, 5))
    state = model.init_state(2)
    out = model(x, labels=x, state=state)
    model(x, state=out.state.detach()).logits.sum().backward()  # a carried, detached state
    assert seen == [(True, True)] * 10
    assert not state.tiers.requires_grad and not state.memory.requires_grad  # the caller's state untouched
    with torch.no_grad():
        model(x)
    assert seen[10:] == [(False, False)] * 5


def _quick_start_code() -> str:
    text = (Path(__file__).parents[1] / "docs" / "thl.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    return block


@pytest.mark.slow
def test_design_document_quick_start_runs_as_written():
    code = _quick_start_code()
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    namespace = {"tokenizer": ByteTokenizer()}
    exec(compile(code, "docs/thl.md", "exec"), namespace)
    assert namespace["logits"].shape == (1, 50257)
    assert len(namespace["generated_tokens"]) == 100
    assert isinstance(namespace["output"], str) and namespace["output"].startswith("The future of AI is")


def test_quick_start_api_on_a_small_model():
    """The quick start's calls, on a small model: shapes, and the engine's steps match the model."""
    from dynlm.thl import InferenceState, LayeredInferenceEngine, THLConfig, generate_text
    from dynlm.thl import THLModel as ApiModel

    torch.manual_seed(0)
    config = THLConfig(num_tiers=2, memory_slots=8, dim=16, vocab_size=300, read_heads=2, read_topk=2,
                       local_window=4, local_query_dim=8)
    model = ApiModel(config).eval()
    input_ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        logits, state = model(input_ids)
    assert logits.shape == (1, 6, 300) and isinstance(state, THLState)
    text = generate_text(model=model, tokenizer=ByteTokenizer(), prompt="Hi", max_length=10, temperature=0.8,
                         top_k=50, seed=0)
    assert text.startswith("Hi")
    engine = LayeredInferenceEngine(model, device="cpu")
    state = InferenceState.init(batch_size=1, config=config, tiers=model.tiers, memory_bank=model.memory_bank)
    steps = []
    for token in input_ids[0]:
        step_logits, state = engine.step(torch.tensor([[int(token)]]), state)
        steps.append(step_logits)
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-5, rtol=1e-5)


def test_compile_mode_is_checked():
    with pytest.raises(ConfigError, match="compile_mode"):
        dynlm.build_model("thl-tiny", compile_mode="max-speed")


def test_detached_state_is_a_copy():
    # a CUDA-graphed step reuses its output memory on the next replay: the carried state must not alias it
    model = tiny().eval()
    with torch.no_grad():
        state = model(torch.randint(0, VOCAB, (2, 5)), state=model.init_state(2)).state
    detached = state.detach()
    for a, b in zip(state.tensors(), detached.tensors()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


@pytest.mark.parametrize("bptt_chunk", [0, 4])
def test_compiled_step_compiles_once_per_grad_mode_over_a_run(bptt_chunk):
    """Over training steps on different data (full BPTT or chunks with a carried state) and
    evaluations at several lengths, the step is traced once with grad and once without: nothing in
    it (positions, data, the train/eval switch) makes dynamo recompile per step or per length.
    Dynamo's graph count with the eager backend, so nothing is compiled by inductor."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny(compile_step=True, bptt_chunk=bptt_chunk).train()
    counter = CompileCounter()
    model._step_fn = torch.compile(model.step, backend=counter, dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(model, model, opt, torch.device("cpu"), torch.float32, clip=1.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        for _ in range(3):
            step([torch.randint(0, VOCAB, (2, 8), generator=generator)])
        model.eval()
        with torch.no_grad():
            for length in (3, 11):
                model(torch.randint(0, VOCAB, (2, length), generator=generator))
        model.train()
    assert counter.frame_count == 2
    torch._dynamo.reset()
