"""Beam search in the generation engine: its scores are what it says they are (checked against
the model's own log-probabilities), one beam is greedy decoding, and bad arguments are errors.
Parity with `transformers` is in test_beam_search_hf.py (slow)."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.errors import ConfigError
from dynlm.infer.generate import beam_search, generate_ids, token_logprobs
from test_serve import tiny_checkpoint

PROMPT = [256, 72, 105, 33]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model = dynlm.load_pretrained(tiny_checkpoint(tmp_path_factory.mktemp("beam") / "tiny", seed=4))
    with torch.no_grad():  # sharper distributions than the default init, so that beams differ
        model.lm_head.weight.mul_(40)
    return model


def test_one_beam_is_greedy(model):
    greedy = generate_ids(model, torch.tensor([PROMPT]), 10, eos_ids=[])[0, len(PROMPT):].tolist()
    assert beam_search(model, PROMPT, num_beams=1, max_new_tokens=10)[0].ids == greedy


@pytest.mark.parametrize("length_penalty", [-2.0, 0.0, 1.0, 3.0])
def test_scores_are_length_penalised_log_probabilities(model, length_penalty):
    eos = beam_search(model, PROMPT, 4, 6)[1].ids[2]  # a token the beams produce mid-answer
    hypotheses = beam_search(model, PROMPT, num_beams=4, max_new_tokens=6, length_penalty=length_penalty,
                             eos_ids=[eos])
    assert len(hypotheses) == 4
    assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    for h in hypotheses:
        assert h.ids[-1] == eos or len(h.ids) == 6
        total = sum(token_logprobs(model, PROMPT, h.ids)[0])
        assert h.score == pytest.approx(total / len(h.ids) ** length_penalty, abs=1e-4)


def test_beam_search_rejects_bad_arguments(model):
    with pytest.raises(ConfigError):
        beam_search(model, PROMPT, num_beams=0)
    with pytest.raises(ConfigError):
        beam_search(model, [], num_beams=2)


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, model):
    """The module's sharpened model saved as a checkpoint, for the CLI."""
    from dynlm.data.tokenizers import ByteTokenizer

    return model.save_pretrained(tmp_path_factory.mktemp("beam_cli") / "sharp", tokenizer=ByteTokenizer())


def test_cli_num_beams_prints_the_best_beam(sharp_checkpoint, model, capsys, monkeypatch):
    """`dynlm generate --num-beams 4 --length-penalty 2` runs beam search with those settings and
    prints its best hypothesis."""
    import dynlm.infer.generate as engine
    from dynlm.cli import main
    from dynlm.data.tokenizers import ByteTokenizer

    expected = engine.beam_generate(model, ByteTokenizer(), "Hi!", num_beams=4, max_new_tokens=8, length_penalty=2.0,
                                    chat=False)
    calls = []

    def recording(*args, **kwargs):
        calls.append(args[2:5])  # num_beams, max_new_tokens, length_penalty
        return beam_search(*args, **kwargs)

    monkeypatch.setattr(engine, "beam_search", recording)
    assert main(["generate", "--model", str(sharp_checkpoint), "--prompt", "Hi!", "--raw", "--max-new-tokens", "8",
                 "--num-beams", "4", "--length-penalty", "2"]) == 0
    assert calls == [(4, 8, 2.0)]
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("extra,message", [(["--num-beams", "0"], "--num-beams must be >= 1, got 0"),
                                           (["--num-beams", "2", "--temperature", "0.7"], "does not combine with"),
                                           (["--length-penalty", "2"], "applies to beam search")])
def test_cli_beam_options_are_checked(sharp_checkpoint, capsys, extra, message):
    from dynlm.cli import main

    assert main(["generate", "--model", str(sharp_checkpoint), "--prompt", "hi", *extra]) == 2
    assert message in capsys.readouterr().err
