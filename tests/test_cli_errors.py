"""The CLI's contract, command by command: a user mistake is one line and exit code 2, nothing is
half-written, and nothing that exists is destroyed (output folders are refused unless --force).
Tiny models and a small synthetic corpus; everything here runs in-process."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.cli import main
from dynlm.data.tokenizers import ByteTokenizer, load_tokenizer
from dynlm.weights import export_code_checkpoint
from dynlm.weights.delta import diff

WORDS = ["the", "king", "queen", "lord", "shall", "not", "be", "or", "to", "love", "night", "day", "sweet"]


def one_line_error(capsys, argv: list, code: int = 2) -> str:
    """Run the CLI, expect exit code `code` and a single `dynlm: error:` line; return it."""
    try:
        returned = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        returned = e.code
    assert returned == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("dynlm: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


def ok(capsys, argv: list) -> tuple[str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(4):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                 for _ in range(rng.randint(50, 70))]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A tiny base checkpoint, a tuned copy, the base as code and a delta from base to tuned."""
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=2, intermediate_size=64,
                              max_position_embeddings=64)
    model.save_pretrained(root / "base", tokenizer=load_tokenizer("bytes"))
    with torch.no_grad():
        model.model.norm.weight[0] = 3.0
    model.save_pretrained(root / "tuned", tokenizer=load_tokenizer("bytes"))
    export_code_checkpoint(root / "base", root / "code")
    diff(root / "base", root / "tuned", root / "delta")
    return {name: root / name for name in ("base", "tuned", "code", "delta")}


def tiny_train(corpus: Path, out: Path, name: str = "run", **train) -> list[str]:
    settings = {"max_steps": 8, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 4,
                "save_every": 4, "eval_bytes": 512, "eval_batch_size": 4, "progress": False, "final_eval": [],
                "sample_prompt": None, "plot": False, "device": "cpu", **train}
    return ["model.preset=standard-tiny", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
            "model.num_kv_heads=1", "model.intermediate_size=64", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.seq_len=32", f"out_dir={out}", f"run_name={name}",
            *(f"train.{k}={json.dumps(v) if isinstance(v, list) else ('null' if v is None else v)}"
              for k, v in settings.items())]


def occupied(folder: Path) -> dict[str, bytes]:
    """A destination that already holds a user's files: a git folder and a note."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("my notes\n")
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. output folders: refused unless --force, nothing destroyed

WRITERS = {
    "weights export": lambda c, d: ["weights", "export", c["base"], d],
    "weights import": lambda c, d: ["weights", "import", c["code"], d],
    "weights diff": lambda c, d: ["weights", "diff", c["base"], c["tuned"], "-o", d],
    "weights apply": lambda c, d: ["weights", "apply", c["base"], c["delta"], "-o", d],
    "weights clone": lambda c, d: ["weights", "clone", c["base"], d],
    "weights analyze": lambda c, d: ["weights", "analyze", c["base"], "--out", d, "--no-plots"],
    "weights find-neurons": lambda c, d: ["weights", "find-neurons", c["base"], "--example", "the king", "--out", d],
    "weights specialize": lambda c, d: ["weights", "specialize", c["base"], "--domain", "x", "--corpus", c["base"],
                                        "-o", d],
    "tokenizer train": lambda c, d: ["tokenizer", "train", "--corpus", c["base"], "-o", d],
    "convert": lambda c, d: ["convert", c["base"], d],
    "bench --out": lambda c, d: ["bench", "--smoke", "--out", d],
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_writing_commands_refuse_a_non_empty_folder(tmp_path, ckpts, capsys, command):
    dest = tmp_path / "dest"
    before = occupied(dest)
    line = one_line_error(capsys, WRITERS[command](ckpts, dest))
    assert "not empty" in line and "--force" in line
    assert snapshot(dest) == before  # nothing deleted, nothing added


@pytest.mark.parametrize("command", ["weights export", "weights import", "weights apply", "weights clone",
                                     "weights diff", "convert", "tokenizer train"])
def test_force_replaces_the_contents_but_keeps_hidden_entries(tmp_path, ckpts, capsys, command):
    if command == "tokenizer train":  # a corpus to train on
        argv = ["tokenizer", "train", "--corpus", Path(__file__), "--vocab-size", "300", "-o", tmp_path / "dest"]
    else:
        argv = WRITERS[command](ckpts, tmp_path / "dest")
    occupied(tmp_path / "dest")
    ok(capsys, [*argv, "--force"])
    names = {p.name for p in (tmp_path / "dest").iterdir()}
    assert ".git" in names and "notes.txt" not in names and not any(n.startswith(".dynlm-tmp") for n in names)
    assert (tmp_path / "dest" / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


def test_output_to_the_current_folder(tmp_path, ckpts, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    ok(capsys, ["weights", "export", ckpts["base"], "."])
    assert (here / "weights.py").is_file()
    assert "not empty" in one_line_error(capsys, ["weights", "export", ckpts["base"], "."])
    ok(capsys, ["weights", "export", ckpts["base"], ".", "--force"])
    assert sorted(p.name for p in here.iterdir() if p.name.startswith(".")) == []
    dynlm.load_pretrained(here)


def test_written_files_follow_the_umask(tmp_path, ckpts, capsys):
    old = os.umask(0o022)
    try:
        ok(capsys, ["weights", "import", ckpts["code"], tmp_path / "conv"])
        model = dynlm.load_pretrained(ckpts["base"])
        model.save_pretrained(tmp_path / "saved", tokenizer=load_tokenizer("bytes"))  # the trainer's atomic write
        load_tokenizer("bytes").save(tmp_path / "tok")
        paths = [tmp_path / "conv", *(tmp_path / "conv").iterdir(), tmp_path / "saved",
                 *(tmp_path / "saved").iterdir(), *(tmp_path / "tok").iterdir()]
        assert {"model.safetensors", "tokenizer.json"} <= {p.name for p in paths}
        for path in paths:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    finally:
        os.umask(old)


# ---------------------------------------------------------------------------------------------
# 2, 3, 10, 11. the run folder: refused resume, interrupts, validation first, messages

def test_refused_resume_leaves_the_config_alone(tmp_path, corpus, capsys):
    ok(capsys, ["train", *tiny_train(corpus, tmp_path / "runs")])
    run_dir = tmp_path / "runs" / "run"
    config = (run_dir / "config.yaml").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("a different corpus, a different length\n" * 300)
    line = one_line_error(capsys, ["train", "--resume", run_dir, f"data.corpus={other}", "train.max_steps=12"])
    assert "cannot resume" in line and "changed" in line
    assert (run_dir / "config.yaml").read_text() == config
    ok(capsys, ["train", "--resume", run_dir, "train.max_steps=10"])  # a plain resume still works


@pytest.mark.parametrize("signum", [2, pytest.param(15, marks=pytest.mark.slow)])  # SIGINT, SIGTERM
def test_a_signal_before_the_first_save_saves_and_a_rerun_offers_the_resume(tmp_path, corpus, capsys, signum):
    from dynlm.train import train
    from dynlm.train.trainer import read_metrics

    settings = tiny_train(corpus, tmp_path / "runs", save_every=100)
    reference = train(None, [*tiny_train(corpus, tmp_path / "runs", name="reference", save_every=100)])

    def send_signal(event, trainer, info):
        if event == "step" and info["step"] == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(KeyboardInterrupt):
        train(None, settings, callbacks=[send_signal])
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "run"
    assert "at step 3: saved" in err and f"--resume {run_dir}" in err
    assert ("SIGTERM" in err) == (signum == 15)
    # the same command again: refused with the way to continue, nothing touched
    line = one_line_error(capsys, ["train", *settings])
    assert "stopped at step 3 of 8" in line and f"dynlm train --resume {run_dir}" in line
    ok(capsys, ["train", "--resume", run_dir])
    losses = lambda d: [r["loss"] for r in read_metrics(d) if r["event"] == "train"]  # noqa: E731
    assert losses(run_dir) == losses(reference)  # bit for bit


def test_sigterm_through_the_cli_is_one_line(tmp_path, corpus, capsys, monkeypatch):
    from dynlm.train import trainer as trainer_module

    real_fit = trainer_module.Trainer.fit

    def fit_then_term(self):
        self.callbacks.append(lambda e, t, i: os.kill(os.getpid(), 15) if e == "step" and i["step"] == 2 else None)
        return real_fit(self)

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit_then_term)
    assert main(["train", *tiny_train(corpus, tmp_path / "runs")]) == 143
    err = capsys.readouterr().err
    assert "stopped (SIGTERM) at step 2: saved" in err and err.strip().endswith("dynlm: terminated")


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=3", "multiple of grad_accum"),
    ("data.splits=[1,0,0]", "leaves the val split empty"),
    ("init_from=/nowhere/at/all", "/nowhere/at/all"),
])
def test_failed_runs_leave_no_folder(tmp_path, corpus, capsys, override, message):
    assert message in one_line_error(capsys, ["train", *tiny_train(corpus, tmp_path / "runs"), override])
    assert not (tmp_path / "runs" / "run").exists()


def test_empty_corpus_leaves_no_folder(tmp_path, corpus, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    one_line_error(capsys, ["train", *tiny_train(corpus, tmp_path / "runs"), f"data.corpus={empty}"])
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.slow
def test_resume_messages(tmp_path, corpus, capsys):
    ok(capsys, ["train", *tiny_train(corpus, tmp_path / "runs", max_steps=4)])
    run_dir = tmp_path / "runs" / "run"
    out, err = ok(capsys, ["train", "--resume", run_dir, "train.max_steps=6"])
    assert "this session" in out and "training in all, with the sessions it resumed" in out
    out, err = ok(capsys, ["train", "--resume", run_dir])
    assert "nothing left to train: the run finished at step 6" in err
    assert "finished run (step 6 of 6)" in one_line_error(capsys, ["train", *tiny_train(corpus, tmp_path / "runs")])


def test_train_without_arguments_says_what_it_will_do(capsys, monkeypatch):
    import dynlm.train

    calls = []
    monkeypatch.setattr(dynlm.train, "train", lambda *a, **k: calls.append((a, k)))
    assert main(["train"]) == 0
    err = capsys.readouterr().err
    assert "no config given: training the 'quick' preset" in err and "1500 steps on shakespeare" in err
    assert calls and calls[0][0][0] == "quick"


def test_short_runs_scale_the_warmup(tmp_path, corpus, capsys):
    from dynlm.train import load_run_config

    code = main(["train", *tiny_train(corpus, tmp_path / "runs", max_steps=10, warmup_steps=100)])
    assert code == 0 and "warm-up: 2 steps instead of train.warmup_steps=100" in capsys.readouterr().err
    saved = load_run_config(tmp_path / "runs" / "run" / "config.yaml")
    assert saved.train.warmup_steps == 2
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines())
           if r["event"] == "train"]
    assert max(lrs) == pytest.approx(saved.train.lr) and lrs[-1] < lrs[2]  # reaches the peak, then decays


# ---------------------------------------------------------------------------------------------
# 4, 6. tracebacks that became one line

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_generate_on_a_missing_device(ckpts, capsys):
    assert "CUDA is not available" in one_line_error(
        capsys, ["generate", "--model", ckpts["base"], "--prompt", "a", "--device", "cuda"])


def test_generate_on_an_unknown_device(ckpts, capsys):
    line = one_line_error(capsys, ["generate", "--model", ckpts["base"], "--prompt", "a", "--device", "tpu"])
    assert "--device 'tpu' is not a device" in line


def test_eval_text_on_a_file_that_is_not_utf8(ckpts, tmp_path):
    # bytes that are not UTF-8 are kept, not refused (a BPE model reads them as U+FFFD); bits per
    # byte divide by the file's own bytes
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 10)
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(ckpts["base"]), "--text", str(binary), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["num_bytes"] == 100


def test_bench_compare_with_a_bad_value(capsys):
    assert "bad --compare value 'batch=abc'" in one_line_error(capsys, ["bench", "--smoke", "--compare", "batch=abc"])


def test_bench_decode_contexts_beyond_the_positions(capsys):
    line = one_line_error(capsys, ["bench", "--preset", "gpt2-small-like", "--decode-contexts", "100000"])
    assert "exceed the 1024 positions" in line and "max_position_embeddings" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_tokenizer_train_into_an_unwritable_place(capsys, tmp_path):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("hello world\n" * 50)
    line = one_line_error(capsys, ["tokenizer", "train", "--corpus", corpus_file, "--vocab-size", "300",
                                   "-o", "/proc/x/"])
    assert "/proc/x" in line


def test_a_config_json_holding_a_list(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1, 2, 3]")
    line = one_line_error(capsys, ["generate", "--model", tmp_path / "m", "--prompt", "a"])
    assert "expected a JSON object, found a list" in line


def test_generate_past_the_model_positions(ckpts, capsys):
    line = one_line_error(capsys, ["generate", "--model", ckpts["base"], "--prompt", "a" * 20,
                                   "--max-new-tokens", "100"])
    assert "exceeds the model's 64 positions" in line and "--max-new-tokens 43" in line


def test_eval_seq_len_past_the_model_positions(ckpts, capsys, tmp_path):
    (tmp_path / "t.txt").write_text("some text " * 50)
    line = one_line_error(capsys, ["eval", "--model", ckpts["base"], "--text", tmp_path / "t.txt",
                                   "--seq-len", "4096"])
    assert "--seq-len 4096 exceeds the model's 64 positions" in line and "sliding" in line


def test_other_one_line_errors(ckpts, capsys, tmp_path):
    """The rest of the commands: each mistake is one line."""
    assert "no such file" in one_line_error(capsys, ["weights", "export", tmp_path / "nothing", tmp_path / "o"])
    assert "not found" in one_line_error(capsys, ["eval", "--model", ckpts["base"], "--text", tmp_path / "no.txt"])
    assert "no prompt" in one_line_error(capsys, ["generate", "--model", ckpts["base"]])
    assert "outside the vocabulary" in one_line_error(capsys, ["tokenizer", "decode", "999"])
    assert "unknown training preset" in one_line_error(capsys, ["train", "quik"])


# ---------------------------------------------------------------------------------------------
# 7, 8. chat default, model.preset, named checkpoints, --dtype

def test_python_and_cli_agree_on_the_chat_template(ckpts):
    from dynlm.infer.generate import encode_prompt

    model = dynlm.load_pretrained(ckpts["base"])
    chat_tok = ByteTokenizer(chat_template="{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert encode_prompt(chat_tok, "hi") == chat_tok.encode("<hi>")  # template by default
    assert encode_prompt(chat_tok, "hi", chat=False) == [256, *b"hi"]
    assert encode_prompt(ByteTokenizer(), "hi") == [256, *b"hi"]  # no template: as is
    assert dynlm.generate(model, chat_tok, "hi", max_new_tokens=3) == dynlm.generate(
        model, chat_tok, "hi", max_new_tokens=3, chat=True)


def test_raw_prompt_to_a_chat_model_that_answers_nothing_gets_a_hint(ckpts, capsys, tmp_path, monkeypatch):
    import dynlm.infer.generate as gen

    model_dir = tmp_path / "chat"
    dynlm.load_pretrained(ckpts["base"]).save_pretrained(model_dir, tokenizer=ByteTokenizer(chat_template="{{ x }}"))
    monkeypatch.setattr(gen, "stream_generate", lambda *a, **k: iter(()))  # a chat model that ends its turn at once
    out, err = ok(capsys, ["generate", "--model", model_dir, "--prompt", "What?", "--raw", "--max-new-tokens", "8"])
    assert "chat model and --raw fed the prompt without its chat template" in err


def test_model_preset_override_of_a_preset_built_on_another():
    from dynlm.train import load_run_config
    from dynlm.train.config import resolve_model_config

    run = load_run_config("quick", ["model.preset=mod-quick"])
    assert resolve_model_config(run, 2048).type == "mod"


def test_generate_takes_a_named_checkpoint_and_a_dtype(ckpts, capsys, monkeypatch):
    from dynlm import interop

    monkeypatch.setitem(interop.NAMED_SOURCES, "smollm2-135m-instruct", lambda: ckpts["base"])
    out, _ = ok(capsys, ["generate", "--model", "smollm2-135m-instruct", "--prompt", "ab", "--max-new-tokens", "3",
                         "--dtype", "bfloat16", "--no-stream"])
    assert out.startswith("### ab")


# ---------------------------------------------------------------------------------------------
# 9, 17. data: vocab shortfall, exact --max-bytes, one-line files, single-file eval

def test_tokenizer_train_says_when_the_vocabulary_falls_short(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("to be or not to be\n" * 40)
    out, err = ok(capsys, ["tokenizer", "train", "--corpus", text, "--vocab-size", "8192", "-o", tmp_path / "tok"])
    assert "gave only" in err and "of the 8192 asked for" in err
    assert load_tokenizer(tmp_path / "tok").vocab_size < 8192


def test_max_bytes_is_exact_on_ascii_text():
    from dynlm.eval.evaluate import text_spans

    texts = ["".join(random.Random(i).choice("abcdefgh \n") for _ in range(3000)) for i in range(4)]
    for max_bytes in (5000, 4999, 17, 1000):
        assert sum(len(s.encode()) for s in text_spans(texts, max_bytes)) == max_bytes


def test_a_one_line_file_is_split_between_words():
    from dynlm.data.corpora import split_documents

    parts = split_documents([("f", "one two three four five six seven eight nine ten eleven twelve")])
    pieces = [text for split in ("train", "val", "test") for _, text in parts[split]]
    text = "one two three four five six seven eight nine ten eleven twelve"
    assert "".join(pieces) == text and len(pieces) == 3
    assert [word for piece in pieces for word in piece.split()] == text.split()  # no word cut in two


def test_eval_corpus_on_a_single_file_scores_the_whole_file(ckpts, capsys, tmp_path):
    text = tmp_path / "essay.txt"
    text.write_text("A single document of a few lines.\nIt has more than one line.\nAnd a third one.\n")
    out, err = ok(capsys, ["eval", "--model", ckpts["base"], "--corpus", text])
    result = json.loads(out)
    assert result["num_bytes"] == len(text.read_bytes()) and result["data"].endswith("(whole file)")
    assert "scoring all of it" in err


# ---------------------------------------------------------------------------------------------
# 11, 12, 13. specialize's result, the MoD baseline, threads

def test_specialize_names_no_deleted_folder(tmp_path, ckpts, corpus, capsys):
    from dynlm.weights.delta import Delta

    out, _ = ok(capsys, ["weights", "specialize", ckpts["code"], "--domain", "legal", "--corpus", corpus, "-o",
                         tmp_path / "delta", "--steps", "2", "--set", "data.seq_len=32", "--set", "train.batch_size=2",
                         "--set", "train.progress=false", "--set", "train.final_eval=[]", "--set", "train.plot=false",
                         "--set", "train.sample_prompt=null", "--set", "train.eval_bytes=256"])
    header = Delta(tmp_path / "delta").header
    assert "temporary" in header["result"] and "dynlm-specialize" not in json.dumps(header)
    assert f"wrote {tmp_path / 'delta'}" in out and "temporary and is removed" in out


def test_routing_line_shows_the_never_route_baseline():
    from dynlm.commands.eval import routing_line

    class Routed:
        def routed_capacities(self):
            return {1: 0.125, 3: 0.125}

    line = routing_line(Routed(), {"routing": "causal", "route/causal_acc": 0.875, "route/causal_frac": 0.0})
    assert "agrees with top-k on 87.5%" in line and "never routes agrees on 87.5%" in line and "warning" in line
    healthy = routing_line(Routed(), {"routing": "causal", "route/causal_acc": 0.95, "route/causal_frac": 0.11})
    assert "warning" not in healthy


def test_threads_option_and_default(capsys, monkeypatch):
    from dynlm.cli import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        ok(capsys, ["tokenizer", "info", "bytes", "--threads", "1"])
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert 1 <= default_threads() <= usable
        assert "positive number of threads" in one_line_error(capsys, ["--threads", "0", "info"])
    finally:
        torch.set_num_threads(before)
