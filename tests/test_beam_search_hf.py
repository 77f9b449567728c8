"""Beam search with a length penalty against `transformers`' beam search on the same imported
checkpoint: the same hypotheses, in the same order, with the same scores (slow: transformers)."""

from __future__ import annotations

import pytest
import torch

from dynlm.infer.generate import beam_search
from dynlm.interop import load_hf_checkpoint
from test_interop import VOCAB, reference_model

PROMPT = [5, 17, 42, 8, 99, 3]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    reference = reference_model("llama-tied", seed=3)
    directory = tmp_path_factory.mktemp("beam")
    reference.save_pretrained(directory)
    return reference, load_hf_checkpoint(directory)


@pytest.fixture(scope="module")
def eos(models) -> int:
    """A token the beams actually produce mid-answer, so that hypotheses finish at different
    lengths and the length penalty matters: the first that does, among the tokens of the
    EOS-free hypotheses."""
    ours = models[1]
    candidates = [t for h in beam_search(ours, PROMPT, 4, 8, length_penalty=1.0) for t in h.ids[1:6]]
    for token in dict.fromkeys(candidates):
        if len({len(h.ids) for h in beam_search(ours, PROMPT, 4, 8, length_penalty=1.0, eos_ids=[token])}) > 1:
            return token
    raise AssertionError("no token makes hypotheses of different lengths")


@pytest.mark.parametrize("length_penalty, early_stopping", [(0.0, False), (1.0, False), (2.5, False), (-1.0, False),
                                                           (1.0, True)])
def test_beam_search_matches_transformers(models, eos, length_penalty, early_stopping):
    reference, ours = models
    num_beams, max_new = 4, 8
    expected = reference.generate(torch.tensor([PROMPT]), num_beams=num_beams, num_return_sequences=num_beams,
                                  max_new_tokens=max_new, do_sample=False, length_penalty=length_penalty,
                                  early_stopping=early_stopping, eos_token_id=eos, pad_token_id=VOCAB - 1,
                                  output_scores=True, return_dict_in_generate=True)
    got = beam_search(ours, PROMPT, num_beams=num_beams, max_new_tokens=max_new, length_penalty=length_penalty,
                      eos_ids=[eos], early_stopping=early_stopping)
    assert len(got) == num_beams
    lengths = set()
    for row, hypothesis in enumerate(got):
        sequence = expected.sequences[row, len(PROMPT):].tolist()
        sequence = sequence[: len(hypothesis.ids)]
        assert hypothesis.ids == sequence
        assert hypothesis.score == pytest.approx(float(expected.sequences_scores[row]), abs=1e-4)
        lengths.add(len(hypothesis.ids))
    if length_penalty == 1.0:
        assert len(lengths) > 1  # finished at different lengths: the penalty was exercised
