"""The NumPy runtime: logits equal to the torch model's within 1e-4 (fp32), and it runs in a
process where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dynlm
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError
from dynlm.weights import export_code_checkpoint
from dynlm.weights.numpy_runtime import NumpyLM

VOCAB = 258


def tiny(**overrides):
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("overrides", [
    {},
    {"attention_bias": True, "tie_word_embeddings": False, "sliding_window": 4, "sliding_window_layers": [1],
     "family": "qwen2"},
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_match_torch(tmp_path, overrides, dtype):
    model = tiny(**overrides)
    export_code_checkpoint(model, tmp_path / "code", dtype=None if dtype == "float32" else dtype)
    reference = dynlm.load_pretrained(tmp_path / "code")  # fp32 compute on the stored values
    x = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x).logits.numpy()
    lm = NumpyLM(tmp_path / "code")
    got = lm(x.numpy())
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-4
    # incremental decoding with the cache gives the same logits
    cache = lm.new_cache()
    steps = [lm.forward(x[:, :6].numpy(), cache, 0)] + [lm.forward(x[:, t:t + 1].numpy(), cache, t)
                                                          for t in range(6, 13)]
    assert np.abs(np.concatenate(steps, axis=1) - expected).max() < 1e-4


def test_greedy_generation_matches_torch(tmp_path):
    from dynlm.infer.generate import generate_ids

    model = tiny()
    export_code_checkpoint(model, tmp_path / "code")
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = generate_ids(model, prompt, max_new_tokens=8, temperature=0.0)[:, 5:]
    assert np.array_equal(NumpyLM(tmp_path / "code").generate(prompt.numpy(), max_new_tokens=8), expected.numpy())


def test_other_architectures_are_refused_clearly(tmp_path):
    archs = [a for a in dynlm.list_architectures() if a != "standard"]
    if not archs:
        pytest.skip("only the standard architecture is registered")
    model = dynlm.build_model(f"{archs[0]}-tiny", vocab_size=VOCAB)
    export_code_checkpoint(model, tmp_path / "code")
    with pytest.raises(CheckpointError, match="NumPy runtime runs standard"):
        NumpyLM(tmp_path / "code")


BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now fails\n"


def run_without_torch(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=120)


def test_runs_where_torch_cannot_be_imported(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "orig", tokenizer=load_tokenizer("bytes"))
    export_code_checkpoint(tmp_path / "orig", tmp_path / "code")
    x = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x).logits.numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    result = run_without_torch(f"""
        import numpy as np
        from dynlm.weights.numpy_runtime import NumpyLM, main
        lm = NumpyLM({str(tmp_path / "code")!r})
        np.save({str(tmp_path / "logits.npy")!r}, lm(np.load({str(tmp_path / "x.npy")!r})))
        code = main([{str(tmp_path / "code")!r}, "--prompt", "Hi", "--max-new-tokens", "4"])
        assert sys.modules["torch"] is None, "torch was imported"
        print("exit", code)
    """)
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "logits.npy") - expected).max() < 1e-4
    assert result.stdout.strip().splitlines()[0].startswith("Hi") and "exit 0" in result.stdout


def test_cli_command_is_torch_free(tmp_path):
    """`dynlm weights numpy-run`: the weights command module registers and runs without torch."""
    export_code_checkpoint(tiny(), tmp_path / "code", tokenizer=load_tokenizer("bytes"))
    result = run_without_torch(f"""
        import argparse, json
        from dynlm.commands import weights
        parser = argparse.ArgumentParser()
        weights.register(parser.add_subparsers())
        args = parser.parse_args(["weights", "numpy-run", {str(tmp_path / "code")!r}, "--ids", "1,2,3",
                                  "--max-new-tokens", "3"])
        assert args.handler(args) == 0
        print(json.dumps(sys.modules["torch"] is None))
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines[0].split(",")) == 3 and json.loads(lines[1]) is True


def test_numpy_run_flags_are_the_same_in_the_cli_and_the_module():
    import argparse

    from dynlm.cli import build_parser
    from dynlm.weights.run_flags import add_numpy_run_arguments

    def options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
        return {a.dest: (tuple(a.option_strings), a.default, a.type) for a in parser._actions if a.dest != "help"}

    cli = build_parser()
    weights = next(a for a in cli._subparsers._group_actions[0].choices["weights"]._actions
                   if isinstance(a, argparse._SubParsersAction))
    module = argparse.ArgumentParser()
    add_numpy_run_arguments(module)
    # `handler` and the global `--threads` (every command takes it) are the CLI's own
    cli_options = {k: v for k, v in options(weights.choices["numpy-run"]).items() if k not in ("handler", "threads")}
    assert cli_options == options(module)
