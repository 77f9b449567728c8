"""`train()`: a whole run, from config to evaluated checkpoint.

    from dynlm.train import train
    run_dir = train("quick")                                      # a shipped mode preset
    run_dir = train("my_run.yaml", ["train.lr=1e-3", "model.num_layers=8"])
    run_dir = train(resume="runs/my_run")                          # continues exactly where it stopped

Steps: resolve the config; join the process group when launched by torchrun; prepare the
tokenizer and token splits (cached); build the model (or initialise it from `init_from`, copying
every matching tensor); train; evaluate the best checkpoint on the full validation and test
splits; generate a sample; plot the loss curve. Everything lands in the run folder."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dynlm import distributed
from dynlm.checkpoint import is_dynlm_checkpoint, load_checkpoint, model_state_dict, read_safetensors
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError, ConfigError, DynlmError, OutputExistsError
from dynlm.eval.evaluate import score_documents, split_documents_of, summarize
from dynlm.infer.generate import generate
from dynlm.output_dir import check_output_dir, clear_output_dir
from dynlm.registry import get_architecture
from dynlm.train.checkpointing import find_resume_checkpoint, read_trainer_state
from dynlm.train.config import RunConfig, TrainConfig, load_run_config, resolve_model_config
from dynlm.train.curriculum import Curriculum
from dynlm.train.data import prepare_run_data
from dynlm.train.trainer import Callback, Trainer, check_batch_split, load_weights, read_metrics, seed_everything


def _existing_run(run_dir: Path) -> str:
    """What a non-empty run folder holds, and what to do about it, for the refusal message."""
    try:
        checkpoint, _ = find_resume_checkpoint(run_dir)
        state = json.loads((checkpoint / "training.json").read_text())
        step = int(state.get("step", 0))
    except (CheckpointError, OSError, ValueError):
        return f"{run_dir} is not empty and holds no checkpoint to resume"
    try:
        saved = load_run_config(run_dir / "config.yaml")
        max_steps = saved.train.max_steps
    except (DynlmError, OSError):
        max_steps = None
    if max_steps is not None and step >= max_steps:
        return f"{run_dir} holds a finished run (step {step} of {max_steps})"
    of = f" of {max_steps}" if max_steps is not None else ""
    return (f"{run_dir} holds a run stopped at step {step}{of}; continue it with "
            f"`dynlm train --resume {run_dir}`")


def check_run_folder(run_dir: Path, force: bool) -> None:
    """A new run writes into an empty or missing folder; an existing run is continued with
    --resume, replaced with --force, or left alone (another run_name=...)."""
    try:
        check_output_dir(run_dir, force)
    except OutputExistsError:
        raise OutputExistsError(_existing_run(run_dir),
                                "start it over with --force, or name a new run with run_name=NAME") from None


def scale_warmup(cfg: TrainConfig) -> str | None:
    """A warm-up longer than a fifth of the run leaves no room for the schedule (max_steps=60
    with the quick preset's 100 warm-up steps never reaches the peak): shorten it to that fifth.
    Returns the message to print, or None when nothing changed."""
    longest = cfg.max_steps // 5
    if cfg.warmup_steps <= longest:
        return None
    message = (f"warm-up: {longest} steps instead of train.warmup_steps={cfg.warmup_steps}, which is more than a "
               f"fifth of train.max_steps={cfg.max_steps}")
    cfg.warmup_steps = longest
    return message


def check_splits_are_used(run: RunConfig) -> None:
    """Validation needs a val split; the final evaluation needs the splits it names."""
    fractions = dict(zip(("train", "val", "test"), run.data.splits))
    needed = {"val": "validation (every train.eval_every steps and at the end)"}
    for split in run.train.final_eval:
        needed.setdefault(split, f"train.final_eval={list(run.train.final_eval)}")
    for split, why in needed.items():
        if fractions[split] <= 0:
            raise ConfigError(f"data.splits={list(run.data.splits)} leaves the {split} split empty, but {why} "
                              "scores it", "e.g. data.splits=[0.9,0.05,0.05]"
                              + ("" if split == "val" else " or train.final_eval=[val]"))


def transfer_weights(source: torch.nn.Module, target: torch.nn.Module) -> dict[str, list[str]]:
    """Copy every tensor of `source` whose name and shape match one of `target`. Returns the
    names copied, skipped (in the source, no match in the target) and fresh (target tensors
    left at their initialisation)."""
    source_tensors = model_state_dict(source)
    target_state = target.state_dict()
    target_names = set(model_state_dict(target))
    copied, skipped = [], []
    with torch.no_grad():
        for name, tensor in source_tensors.items():
            if name in target_names and tuple(target_state[name].shape) == tuple(tensor.shape):
                target_state[name].copy_(tensor)
                copied.append(name)
            elif name in target_names:
                skipped.append(f"{name} (shape {tuple(tensor.shape)} vs {tuple(target_state[name].shape)})")
            else:
                skipped.append(f"{name} (not in the target)")
    fresh = sorted(target_names - set(copied))
    return {"copied": copied, "skipped": skipped, "fresh": fresh}


def _say(ctx: distributed.DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


ModelLoader = Callable[[str], torch.nn.Module]


def load_dynlm_checkpoint(path: str) -> torch.nn.Module:
    """The default `init_from` loader: dynlm checkpoint directories. Other formats are read by the
    layers above training (interop, weights); their loader is passed in as `load_model`."""
    if not is_dynlm_checkpoint(path):
        raise ConfigError(f"init_from '{path}' is not a dynlm checkpoint directory",
                          "the `dynlm train` command reads any format; from Python pass "
                          "train(..., load_model=dynlm.load_pretrained), or convert it first with `dynlm convert`")
    return load_checkpoint(path)


def train(config: str | Path | dict[str, Any] | RunConfig | None = None,
          overrides: Sequence[str] | dict[str, Any] | None = None, *, resume: str | Path | None = None,
          callbacks: Sequence[Callback] = (), load_model: ModelLoader = load_dynlm_checkpoint,
          force: bool = False) -> Path:
    """Run training and return the run folder. `config` is a mode preset ("quick", "scratch",
    "transfer"), a YAML file, a dict or a RunConfig; `resume` a run folder to continue (its saved
    config, with `overrides` applied on top, e.g. a larger train.max_steps).

    A new run refuses a run folder that already holds something (OutputExistsError, naming the
    run it holds) unless `force`, which replaces it. Everything that can be checked is checked
    before the folder is created, and the saved config changes only once a resume has succeeded.
    Ctrl-C and SIGTERM save the step reached (see Trainer.fit) and raise KeyboardInterrupt.

    `load_model(path)` reads `init_from` (default: dynlm checkpoints; `dynlm.load_pretrained`
    reads every format). `train.code_form` needs a callback that writes the code form
    (`dynlm.weights.lineage.CodeFormSaver`, which the `dynlm train` command adds): training sits
    below the weights layer and does not import it."""
    t_start = time.perf_counter()
    overrides = list(overrides) if overrides is not None and not isinstance(overrides, dict) else overrides
    checkpoint: Path | None = None
    if resume is not None:
        if config is not None:
            raise ConfigError("give either a config or --resume RUN_DIR, not both",
                              "overrides still apply when resuming")
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"{run_dir}: not a run folder (no config.yaml)")
        run = load_run_config(run_dir / "config.yaml", overrides)
    else:
        run = load_run_config(config if config is not None else "quick", overrides)
        run_dir = Path(run.out_dir) / str(run.run_name)
        check_run_folder(run_dir, force)
        warmup_note = scale_warmup(run.train)
    check_splits_are_used(run)

    ctx = distributed.setup(run.train.device)
    fresh_folder = created = False  # fresh_folder: a new run's folder that holds only what we wrote
    try:
        check_batch_split(run.train, ctx.world_size)  # before any data work or folder
        if resume is not None:
            checkpoint, problems = find_resume_checkpoint(run_dir)
            for problem in problems:
                _say(ctx, f"skipping a broken checkpoint: {problem}")

        # data: rank 0 fetches, trains the tokenizer and tokenizes; the others then read the cache.
        # A resumed run uses the tokenizer saved with its checkpoint.
        saved_tokenizer = None
        if checkpoint is not None:
            saved_tokenizer = load_tokenizer(checkpoint)
        if ctx.is_main:
            tokenizer, splits = prepare_run_data(run, tokenizer=saved_tokenizer)
        distributed.barrier(ctx)
        if not ctx.is_main:
            tokenizer, splits = prepare_run_data(run, show_progress=False, tokenizer=saved_tokenizer)

        curriculum = None
        if run.data.curriculum:  # stages tokenized now; the trainer starts in the stage of its step
            curriculum = Curriculum.prepare(run, tokenizer, show_progress=ctx.is_main)
            step = int(read_trainer_state(checkpoint)["step"]) if checkpoint is not None else 0
            splits = {**splits, "train": curriculum.train_split_at(step)}

        torch.manual_seed(run.train.seed)  # the same initial weights on every rank
        model, model_config, transfer = _build_model(run, tokenizer, checkpoint, ctx, load_model)
        if curriculum is not None:
            curriculum.check_model(model)
            callbacks = [*callbacks, curriculum]

        # everything checked: now the run folder
        if ctx.is_main and resume is None:
            created, fresh_folder = not run_dir.exists(), True
            clear_output_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            if transfer is not None:
                (run_dir / "transfer.json").write_text(json.dumps(transfer, indent=2))
        distributed.barrier(ctx)
        _say(ctx, f"run folder: {run_dir}")
        if resume is None and warmup_note:
            _say(ctx, warmup_note)
        _say(ctx, f"model: {model_config.type}, {model.num_parameters() / 1e6:.2f}M parameters, "
                  f"{model_config.num_layers} layers x {model_config.hidden_size}; tokenizer {run.data.tokenizer} "
                  f"(vocab {tokenizer.vocab_size}); {len(splits['train'].tokens):,} training tokens")
        seed_everything(run.train.seed, ctx.rank)

        if run.train.code_form is not None and not any(getattr(c, "writes_code_form", False) for c in callbacks):
            raise ConfigError("train.code_form needs a code-form callback",
                              "the `dynlm train` command adds it; from Python pass "
                              "callbacks=[dynlm.weights.lineage.CodeFormSaver()]")
        trainer = Trainer(run, model, tokenizer, splits, run_dir, ctx, callbacks)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        if ctx.is_main:  # written once the run has started (a refused resume leaves it as it was)
            run.save(run_dir / "config.yaml", model_config)
        if trainer.step >= run.train.max_steps:
            _say(ctx, f"nothing left to train: the run finished at step {trainer.step} (train.max_steps="
                      f"{run.train.max_steps}); evaluating its best checkpoint again. To train on, resume with "
                      f"train.max_steps=N above {trainer.step}")
        fresh_folder = False  # the run has started: its folder stays, whatever happens next
        summary = trainer.fit()
        results = final_evaluation(trainer)
        sample = _sample(trainer)
        if ctx.is_main:
            report = {**summary, "run_dir": str(run_dir), "wall_seconds": time.perf_counter() - t_start,
                      "resumed_train_seconds": trainer.elapsed_before, "evaluation": results, "sample": sample,
                      "checkpoint": str(run_dir / "best") if trainer.best_step is not None else None}
            (run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            if run.train.plot:
                plot_metrics(run_dir)
            _print_summary(report)
        distributed.settle(ctx)
    except BaseException:
        if fresh_folder and ctx.is_main:  # a run that never started leaves nothing behind
            clear_output_dir(run_dir)
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        distributed.teardown(ctx)
    return run_dir


def _build_model(run: RunConfig, tokenizer: Any, checkpoint: Path | None, ctx: distributed.DistContext,
                 load_model: ModelLoader) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """(model on its device, its config, the transfer report of `init_from` or None)."""
    source, transfer = None, None
    if run.init_from and checkpoint is None:
        source = load_model(run.init_from)
    model_config = resolve_model_config(run, tokenizer.vocab_size, source.config if source is not None else None)
    _, model_class = get_architecture(model_config.type)
    model = model_class(model_config)
    if source is not None:
        report = transfer_weights(source, model)
        del source
        transfer = {"init_from": run.init_from, **report}
        _say(ctx, f"initialised from {run.init_from}: copied {len(report['copied'])} tensors, skipped "
                  f"{len(report['skipped'])}, freshly initialised {len(report['fresh'])} (details in transfer.json)")
        if not report["copied"]:
            raise ConfigError(f"init_from '{run.init_from}': no tensor matches the model's names and shapes",
                              "check model.type and the size fields")
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.to(ctx.device), model_config, transfer


def final_evaluation(trainer: Trainer) -> dict[str, Any]:
    """The best checkpoint's figures on the full splits named in `train.final_eval`."""
    cfg = trainer.cfg
    if not cfg.final_eval:
        return {}
    best = trainer.run_dir / "best"
    if trainer.best_step is not None and trainer.best_step != trainer.step:
        _load_into_trained_model(trainer, best)
    results: dict[str, Any] = {"step": trainer.best_step if trainer.best_step is not None else trainer.step}
    for split_name in cfg.final_eval:
        split = trainer.splits[split_name]
        total, count = score_documents(trainer.model, split_documents_of(split), trainer.seq_len, trainer.eval_stride,
                                       cfg.eval_batch_size, trainer.dtype, trainer.ctx)
        results[split_name] = summarize(total, count, int(split.num_bytes), getattr(split, "num_chars", None),
                                        split.num_docs, trainer.seq_len, trainer.eval_stride)
    return results


def _load_into_trained_model(trainer: Trainer, checkpoint: Path) -> None:
    if trainer.cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(trainer.model, read_safetensors(checkpoint), options=StateDictOptions(
            full_state_dict=True, strict=False))
    else:
        load_weights(trainer.model, checkpoint)


def _sample(trainer: Trainer) -> str | None:
    cfg = trainer.cfg
    if cfg.sample_prompt is None or cfg.sample_tokens == 0 or not trainer.ctx.is_main or cfg.fsdp:
        return None
    prompt = cfg.sample_prompt
    if not prompt and not getattr(trainer.tokenizer, "prepend_separator", False):
        return None  # nothing to condition on
    text = generate(trainer.model, trainer.tokenizer, prompt, max_new_tokens=cfg.sample_tokens,
                    temperature=0.8, top_k=50, seed=cfg.seed, chat=False)  # a continuation of the corpus
    return prompt + text


def _print_summary(report: dict[str, Any]) -> None:
    lines = [f"\nrun: {report['run_dir']}"]
    evaluation = report.get("evaluation") or {}
    if report.get("checkpoint"):
        lines.append(f"best checkpoint: {report['checkpoint']} (step {evaluation.get('step', report['best_step'])})")
    for split in ("val", "test", "train"):
        if split in evaluation:
            r = evaluation[split]
            extra = f", {r['bpc']:.4f} bits/char" if "bpc" in r else ""
            lines.append(f"{split:>5}: {r['bpb']:.4f} bits per byte{extra} | {r['loss_nats']:.4f} nats/token | "
                         f"ppl {r['ppl']:.2f} | {r['num_tokens']:,} tokens, stride {r['stride']}")
    if report.get("skipped_steps"):
        lines.append(f"skipped steps (non-finite): {report['skipped_steps']}")
    minutes, seconds = divmod(report["wall_seconds"], 60)
    before = report.get("resumed_train_seconds") or 0.0
    if before:  # train_seconds counts the runs this one resumed, wall_seconds only this session
        lines.append(f"time: {int(minutes)}m{seconds:04.1f}s this session ({report['train_seconds'] - before:.1f}s "
                     f"training); {report['train_seconds']:.1f}s training in all, with the sessions it resumed")
    else:
        lines.append(f"time: {int(minutes)}m{seconds:04.1f}s in all ({report['train_seconds']:.1f}s training)")
    if report.get("sample"):
        lines.append("sample:\n" + report["sample"])
    print("\n".join(lines), flush=True)


def plot_metrics(run_dir: Path) -> Path | None:
    """loss.png: training loss and validation bits per byte against the step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve skipped: matplotlib is not installed (pip install 'dynlm[plot]')", file=sys.stderr)
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if r.get("event") == "eval"]
    fig, left = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        left.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1)
    if evals:
        steps, losses, _ = zip(*evals)
        left.plot(steps, losses, "o-", label="val loss", color="tab:orange", markersize=3)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/token)")
    left.grid(alpha=0.3)
    if evals:
        right = left.twinx()
        right.plot([s for s, _, _ in evals], [b for _, _, b in evals], "s--", color="tab:green", markersize=3,
                   label="val bits/byte")
        right.set_ylabel("val bits per byte")
        lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
        left.legend(lines, labels, loc="upper right")
    elif train:
        left.legend(loc="upper right")
    finite = [loss for _, loss in train if math.isfinite(loss)]
    if finite:
        left.set_ylim(min(finite) * 0.95, min(max(finite), min(finite) * 3))
    left.set_title(run_dir.name)
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
