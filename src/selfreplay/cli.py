"""The ``selfreplay`` command line: a thin layer over the library.

Every command turns bad input into one line on stderr and exit code 2 (see :func:`main`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from selfreplay.config import TrainConfig, describe_config, load_config
from selfreplay.errors import SelfReplayError

CONFIG_HELP = "\b\nCONFIG: YAML files and key.sub=value overrides, applied in order. Keys and defaults:\n\n\b\n"


def _split_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Separate YAML config files from key=value overrides."""
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="selfreplay")
def cli() -> None:
    """Finetune language models without forgetting: KL replay on real or self-generated data."""


# ---------------------------------------------------------------------------- data
@cli.group()
def tokenizer() -> None:
    """Tokenizer commands."""


@tokenizer.command("train")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="tokenizer JSON file to write")
@click.option("--vocab-size", default=4096, show_default=True, help="vocabulary size (10 domain tokens + EOS included)")
@click.option("--max-lines", type=int, default=None, help="use at most this many lines (documents) of each input")
@click.option("--shuffle-seed", type=int, default=0, show_default=True, help="shuffle lines before --max-lines")
@click.option("--text-field", default="text", show_default=True, help="field holding the text in .jsonl/.parquet")
def tokenizer_train(inputs, out, vocab_size, max_lines, shuffle_seed, text_field) -> None:
    """Train a byte-level BPE tokenizer on INPUTS (.txt/.jsonl/.parquet, plain or .gz/.xz)."""
    from selfreplay.tokenizer import train_tokenizer

    tok = train_tokenizer(list(inputs), out, vocab_size=vocab_size, max_lines_per_file=max_lines,
                          shuffle_seed=shuffle_seed, text_field=text_field, progress=True)
    click.echo(f"wrote {out} (vocab {tok.get_vocab_size()})")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(), help="tokenizer JSON file")
@click.option("--out", required=True, type=click.Path(), help="corpus directory to write")
@click.option("--domain-token", type=int, required=True, help="reserved id 0-9 written at position 0 of every sequence")
@click.option("--max-tokens", type=int, default=None, help="keep only the first N tokens")
@click.option("--shuffle-seed", type=int, default=None, help="shuffle documents (lines) with this seed first")
@click.option("--name", default=None, help="corpus name recorded in its metadata (default: directory name)")
@click.option("--text-field", default="text", show_default=True, help="field holding the text in .jsonl/.parquet")
def tokenize(inputs, tokenizer_path, out, domain_token, max_tokens, shuffle_seed, name, text_field) -> None:
    """Tokenize INPUTS into a corpus directory (tokens.bin + meta.json), each document followed by EOS."""
    from selfreplay.data import tokenize_corpus

    meta = tokenize_corpus(list(inputs), tokenizer_path, out, domain_token, max_tokens=max_tokens,
                           shuffle_seed=shuffle_seed, text_field=text_field, name=name)
    click.echo(f"wrote {out}: {meta.num_tokens:,} tokens ({meta.dtype}), domain token {meta.domain_token}")


# ---------------------------------------------------------------------------- training
def _train_command(finetune: bool):
    kind = "finetune" if finetune else "pretrain"

    @click.argument("config", nargs=-1)
    @click.option("--resume", is_flag=True, help="continue the interrupted run in run_dir from its last checkpoint")
    def command(config: tuple[str, ...], resume: bool) -> None:
        from selfreplay.trainer import train

        files, overrides = _split_args(config)
        if finetune and _is_hf_config(files, overrides):
            return _finetune_hf(files, overrides, resume)
        cfg = load_config(TrainConfig, files, overrides)
        summary = train(cfg, finetune=finetune, resume=resume)
        keys = ["valid_loss", "prev_loss", "forgetting", "prev_kl", "steps", "tokens", "train_time", "stop_reason"]
        click.echo(" ".join(f"{k}={_fmt(summary[k])}" for k in keys if summary.get(k) is not None))
        click.echo(f"saved {cfg.run_dir}")

    command.__doc__ = (
        "Pretrain the built-in GPT from scratch." if not finetune else
        "Finetune a checkpoint (init_from=RUN_DIR), optionally with a replay penalty against forgetting.")
    command.__doc__ += "\n\n" + CONFIG_HELP + describe_config(TrainConfig).replace("\n", "\n\n\b\n")
    if finetune:
        from selfreplay.hf_trainer import HFTrainConfig

        command.__doc__ += ("\n\n\b\nHugging Face models: when the config sets model_name_or_path (hub id or local "
                            "directory), these keys apply instead (multi-GPU: torchrun --nproc_per_node N -m "
                            "selfreplay finetune ...):\n\n\b\n"
                            + describe_config(HFTrainConfig).replace("\n", "\n\n\b\n"))
    return cli.command(kind)(command)


def _is_hf_config(files: list[str], overrides: list[str]) -> bool:
    """Whether the merged YAML files and overrides name a Hugging Face model (model_name_or_path)."""
    from omegaconf import OmegaConf

    found = False
    for path in files:
        if Path(path).is_file():
            try:
                layer = OmegaConf.load(path)
            except Exception:  # load_config reports bad YAML with its own message
                continue
            if OmegaConf.is_dict(layer) and "model_name_or_path" in layer:  # later files override earlier ones
                found = bool(layer.get("model_name_or_path"))
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "model_name_or_path":
            found = bool(value.strip())
    return found


def _finetune_hf(files: list[str], overrides: list[str], resume: bool) -> None:
    """`finetune` of a Hugging Face model (in every rank under torchrun; rank 0 prints)."""
    from selfreplay.distributed import is_main, shutdown
    from selfreplay.hf_trainer import HFTrainConfig, train_hf

    cfg = load_config(HFTrainConfig, files, overrides)
    try:
        summary = train_hf(cfg, resume=resume)
        main = is_main()
    finally:
        shutdown()
    if main:
        keys = ["valid_loss", "valid_accuracy", "valid_kl", "steps", "tokens", "train_time", "stop_reason"]
        click.echo(" ".join(f"{k}={_fmt(summary[k])}" for k in keys if summary.get(k) is not None))
        click.echo(f"saved {cfg.run_dir}/model")


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_train_command(finetune=False)
_train_command(finetune=True)


# ---------------------------------------------------------------------------- evaluation
@cli.command("eval")
@click.argument("checkpoints", nargs=-1)
@click.option("--corpus", "corpora", multiple=True,
              help="tokenized corpus directory to evaluate on (repeat); its validation split is used")
@click.option("--teacher", default=None, help="reference checkpoint (default: each checkpoint's init_from); with "
                                              "--model: the Hugging Face model before finetuning")
@click.option("--valid-tokens", type=int, default=None,
              help="validation split size (default: as recorded by the run that trained on the corpus, else 1M)")
@click.option("--split-seed", type=int, default=None, help="split seed (default: as recorded, else 0)")
@click.option("--max-tokens", type=int, default=None, help="evaluate at most this many tokens per corpus / data file")
@click.option("--batch-size", type=int, default=None, help="sequences per forward pass (default: 64; --model: 8)")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also write the rows as JSON")
@click.option("--model", "hf_model", default=None,
              help="a Hugging Face model (hub id or directory) to evaluate instead of CHECKPOINTS")
@click.option("--data", "data_files", multiple=True,
              help="--model: data to score (.jsonl/.parquet/.txt or hub dataset; text, chat or prompt/completion)")
@click.option("--mcq", "mcq_files", multiple=True, help="--model: multiple-choice question file (.jsonl; repeat)")
@click.option("--mcq-format", type=click.Choice(["auto", "chat", "plain"]), default="auto", show_default=True,
              help="--model: question prompts in chat format (auto: when the tokenizer has a chat template)")
@click.option("--lm-eval", "lm_eval_tasks", default=None,
              help="--model: comma-separated lm-evaluation-harness tasks (needs lm_eval installed)")
@click.option("--seq-len", type=int, default=512, show_default=True, help="--model: tokens per packed row")
@click.option("--split", default="test", show_default=True, help="--model: split of hub datasets and data directories")
@click.option("--text-field", default="text", show_default=True, help="--model: field holding plain text")
@click.option("--dtype", default="auto", show_default=True, help="--model: weights dtype (auto, float32, bfloat16)")
def eval_command(checkpoints, corpora, teacher, valid_tokens, split_seed, max_tokens, batch_size, device, json_out,
                 hf_model, data_files, mcq_files, mcq_format, lm_eval_tasks, seq_len, split, text_field,
                 dtype) -> None:
    """Forgetting report: loss and KL of CHECKPOINTS against their teacher on each corpus.

    With --model (a Hugging Face model): loss, next-token accuracy and KL(teacher||model) on each --data file,
    multiple-choice accuracy on each --mcq file, and lm-evaluation-harness --lm-eval tasks.
    """
    from selfreplay.checkpoint import atomic_write_json

    hf_only = {"--data": data_files, "--mcq": mcq_files, "--lm-eval": lm_eval_tasks}
    if hf_model:
        if checkpoints or corpora:
            raise SelfReplayError("eval: give CHECKPOINTS with --corpus, or --model with --data/--mcq/--lm-eval, "
                                  "not both")
        if valid_tokens is not None or split_seed is not None:
            raise SelfReplayError("eval --model: --valid-tokens / --split-seed apply to built-in corpora only")
        from selfreplay.hf_eval import format_hf_report, hf_eval_report

        tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
        max_rows = None if max_tokens is None else max(1, -(-max_tokens // seq_len))
        report = hf_eval_report(hf_model, list(data_files), teacher=teacher, dtype=dtype, device=device,
                                mcq=list(mcq_files), lm_eval_tasks=tasks, seq_len=seq_len, split=split,
                                text_field=text_field, batch_size=batch_size or 8, max_rows=max_rows,
                                mcq_format=mcq_format)
        click.echo(format_hf_report(report))
        if json_out:
            atomic_write_json(json_out, report)
        return
    if not checkpoints:
        raise SelfReplayError("eval: give CHECKPOINTS (built-in runs, with --corpus) or --model (a Hugging Face "
                              "model)")
    if not corpora:
        raise SelfReplayError("eval: --corpus is required with CHECKPOINTS (repeat it for several corpora)")
    given = [name for name, value in hf_only.items() if value]
    if given:
        raise SelfReplayError(f"eval: {', '.join(given)} need --model (a Hugging Face model)")
    from selfreplay.evaluation import forgetting_report, format_report

    rows = forgetting_report(list(checkpoints), list(corpora), teacher=teacher, valid_tokens=valid_tokens,
                             split_seed=split_seed, max_tokens=max_tokens, batch_size=batch_size or 64,
                             device=device)
    click.echo(format_report(rows))
    if json_out:
        atomic_write_json(json_out, rows)


# ---------------------------------------------------------------------------- self-generated replay
def _checkpoint_corpus_meta(info: dict):
    """The training corpus's metadata recorded by a checkpoint, or None when that corpus is gone."""
    from selfreplay.data import Corpus

    spec = info.get("train_corpus") or {}
    path = spec.get("path")
    return Corpus.open(path).meta if path and Path(path).is_dir() else None


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--out", required=True, type=click.Path(), help="replay corpus directory to write")
@click.option("--num-sequences", type=int, required=True, help="number of sequences to sample")
@click.option("--domain", "domains", type=int, multiple=True,
              help="domain token to prompt with (repeat to split rows evenly; default: the checkpoint corpus's)")
@click.option("--batch-size", type=int, default=None, help="sequences sampled per chunk (default: 256; --model: 32)")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
@click.option("--top-p", type=float, default=None, help="nucleus sampling threshold")
@click.option("--stop-at-eos", is_flag=True, help="end samples at EOS (padded and masked) instead of ignoring it")
@click.option("--logprobs-top-k", type=int, default=None,
              help="also store the teacher's top-k log-probs per position (KL targets without a teacher pass)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-resume", is_flag=True, help="discard chunks left by an interrupted run instead of continuing")
@click.option("--model", "hf_model", default=None,
              help="sample from this Hugging Face model (hub id or directory) instead of CHECKPOINT")
@click.option("--length", type=int, default=512, show_default=True,
              help="--model: tokens per sequence (prompt included)")
@click.option("--prompt", type=click.Choice(["bos", "chat"]), default="bos", show_default=True,
              help="--model: prompt every sequence with BOS only (the paper's) or the chat template's prefix")
@click.option("--dtype", default="auto", show_default=True, help="--model: weights dtype (auto, float32, bfloat16)")
def generate(checkpoint, out, num_sequences, domains, batch_size, temperature, top_k, top_p, stop_at_eos,
             logprobs_top_k, seed, device, no_resume, hf_model, length, prompt, dtype) -> None:
    """Sample replay sequences from CHECKPOINT into a corpus that `finetune` takes as replay.source=<dir>.

    With --model: from a Hugging Face model, into a replay corpus (input_ids.npy, loss_mask.npy, replay.json) that
    HF finetuning and SelfReplaySFTTrainer take as their replay source.
    """
    from selfreplay.trainer import resolve_device

    if hf_model:
        given = [name for name, value in (("CHECKPOINT", checkpoint), ("--domain", domains),
                                          ("--stop-at-eos", stop_at_eos), ("--logprobs-top-k", logprobs_top_k))
                 if value]
        if given:
            raise SelfReplayError(f"generate --model: {', '.join(given)} apply to built-in checkpoints only")
        from selfreplay.hf_generate import generate_hf_replay_corpus
        from selfreplay.hf_model import load_causal_lm, load_tokenizer, require_hf

        require_hf("transformers")
        model = load_causal_lm(hf_model, dtype, resolve_device(device))
        info = generate_hf_replay_corpus(model, load_tokenizer(hf_model), out, num_sequences, length, prompt,
                                         batch_size=batch_size or 32, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed, source=hf_model, resume=not no_resume)
        click.echo(f"wrote {out}: {info['num_sequences']:,} sequences of {info['length']} tokens")
        return
    if not checkpoint:
        raise SelfReplayError("generate: give CHECKPOINT (a built-in run) or --model (a Hugging Face model)")
    from selfreplay.checkpoint import load_model
    from selfreplay.generate import generate_replay_corpus

    dev = resolve_device(device)
    model, info = load_model(checkpoint, dev)
    meta = _checkpoint_corpus_meta(info)
    if not domains:
        spec = info.get("train_corpus") or {}
        if spec.get("domain_token") is None:
            raise SelfReplayError(f"{checkpoint} records no domain token; pass --domain")
        domains = (spec["domain_token"],)
    eos = meta.eos_token if meta is not None else None
    if stop_at_eos and eos is None:
        raise SelfReplayError(f"--stop-at-eos: the training corpus of {checkpoint} records no EOS token")
    written = generate_replay_corpus(
        model.eval(), out, num_sequences, list(domains), batch_size=batch_size or 256, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos, stop_at_eos=stop_at_eos, seed=seed, logprobs_top_k=logprobs_top_k,
        tokenizer_fingerprint=info.get("tokenizer_fingerprint", ""), vocab_size=model.config.vocab_size,
        source=str(checkpoint), device=dev, resume=not no_resume)
    click.echo(f"wrote {out}: {written.num_tokens // written.sequence_length:,} sequences of "
               f"{written.sequence_length} tokens")


@cli.command("replay-stats")
@click.argument("replay")
@click.option("--teacher", default=None, help="checkpoint to score the replay with (teacher NLL per token)")
@click.option("--real", default=None, help="real corpus directory for n-gram overlap")
@click.option("--max-sequences", type=int, default=None, help="use at most this many replay sequences")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="where to save the numbers (default: REPLAY-stats.json beside the corpus)")
def replay_stats_command(replay, teacher, real, max_sequences, device, json_out) -> None:
    """Quality of a replay corpus: teacher NLL, distinct-n, domain coverage, overlap with real data."""
    from selfreplay.checkpoint import atomic_write_json, load_model
    from selfreplay.generate import format_replay_stats, replay_stats
    from selfreplay.trainer import resolve_device

    dev = resolve_device(device)
    teacher_model = load_model(teacher, dev)[0].eval() if teacher else None
    stats = replay_stats(replay, teacher=teacher_model, real=real, max_sequences=max_sequences, device=dev)
    click.echo(format_replay_stats(stats))
    json_out = json_out or str(Path(replay).resolve()) + "-stats.json"
    atomic_write_json(json_out, stats)
    click.echo(f"saved {json_out}")


# ---------------------------------------------------------------------------- speed
@cli.command()
@click.argument("overrides", nargs=-1)
@click.option("--methods", default="plain,kl_real,kl_self,sampling", show_default=True,
              help="comma-separated: plain, kl_real, kl_self, sampling (sampled tokens/s of the replay sampler)")
@click.option("--steps", type=int, default=20, show_default=True, help="timed steps per method")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed steps first (compilation)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also save results as JSON")
def bench(overrides, methods, steps, warmup, json_out) -> None:
    """Time the training step of the default model (override with key=value, e.g. data.batch_size=16)."""
    from selfreplay.bench import METHODS, format_bench, run_bench

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise SelfReplayError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    results = run_bench(chosen, list(overrides), steps, warmup)
    click.echo(format_bench(results))
    if json_out:
        from selfreplay.checkpoint import atomic_write_json

        atomic_write_json(json_out, results)


@cli.command("bench-hf")
@click.argument("model")
@click.argument("overrides", nargs=-1)
@click.option("--kinds", default="plain,kl_real,kl_self", show_default=True,
              help="comma-separated step kinds: plain, kl_real (KL on stored rows), kl_self (KL on sampled rows)")
@click.option("--batch-size", type=int, default=8, show_default=True, help="data rows per step")
@click.option("--seq-len", type=int, default=256, show_default=True, help="tokens per row (replay rows too)")
@click.option("--replay-rows", type=int, default=4, show_default=True, help="replay rows per step")
@click.option("--lora-r", type=int, default=0, show_default=True, help="LoRA rank (0: full finetuning)")
@click.option("--chunk-size", type=int, default=1024, show_default=True,
              help="positions whose logits are computed at once (loss_chunk_size)")
@click.option("--steps", type=int, default=5, show_default=True, help="timed steps per kind")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed steps first")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-isolate", is_flag=True, help="run every kind in this process (peaks are then less clean)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also save results as JSON")
def bench_hf(model, overrides, kinds, batch_size, seq_len, replay_rows, lora_r, chunk_size, steps, warmup, device,
             no_isolate, json_out) -> None:
    """Tokens/s and peak memory of a Hugging Face finetuning step: plain vs KL replay (real, self-generated).

    MODEL is a hub id, a local directory, or a random-weight architecture: llama-tiny, llama-small (hidden 256,
    4 layers, 128k vocabulary), llama-1b (Llama-3.2-1B's shape). OVERRIDES are further finetuning options
    (key=value, e.g. gradient_checkpointing=true replay.max_logprobs_gib=0)."""
    from selfreplay.hf_bench import format_hf_bench, run_hf_bench

    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    results = run_hf_bench(model, chosen, batch_size, seq_len, replay_rows, lora_r, chunk_size, steps, warmup,
                           device, isolate=not no_isolate, overrides=list(overrides))
    click.echo(format_hf_bench(results))
    if json_out:
        from selfreplay.checkpoint import atomic_write_json

        atomic_write_json(json_out, results)


# ---------------------------------------------------------------------------- the demo
@cli.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="directory for demo.png, metrics.jsonl and the results table")
@click.option("--full", is_flag=True, help="the paper's configuration (d_model 256, batch 2048, 2000 steps/task; GPU)")
@click.option("--method", type=click.Choice(["ntp", "kl"]), default=None,
              help="replay penalty of the 'with replay' run (default: kl on the CPU preset, ntp with --full as the "
                   "paper's toy)")
@click.option("--source", type=click.Choice(["self", "real"]), default="self", show_default=True,
              help="replay data: the model's own samples or the real earlier tasks")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--steps-per-task", type=int, default=None, help="override the preset's steps per task")
@click.option("--eval-every", type=int, default=None, help="override the preset's evaluation interval (steps)")
def demo(out_dir, full, method, source, seed, device, steps_per_task, eval_every) -> None:
    """Four arithmetic tasks learned one after another, without and with self-generated replay (paper §5.2)."""
    from selfreplay.demo import run_demo

    run_demo(out_dir, full=full, method=method, source=source, seed=seed, device=device,
             steps_per_task=steps_per_task, eval_every=eval_every, echo=click.echo)


# ---------------------------------------------------------------------------- experiment sweeps
@cli.command()
@click.argument("experiment")
@click.option("--scale", type=click.Choice(["cpu", "gpu", "paper"]), default="cpu", show_default=True,
              help="preset of the experiment file")
@click.option("--workers", type=int, default=None, help="parallel runs (default: the number of CPU cores)")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run")
@click.option("--stage", "stages", multiple=True, help="run only these stages (repeat); finished runs are reused")
@click.option("--runs-dir", default="runs", show_default=True, help="runs go to RUNS_DIR/<name>/<scale>/")
@click.option("--dry-run", is_flag=True, help="list the runs and their status, train nothing")
def sweep(experiment, scale, workers, threads, stages, runs_dir, dry_run) -> None:
    """Run an experiment grid (experiments/<name>.yaml or a YAML path): skip finished runs, resume interrupted
    ones, then write results.csv and results_trajectories.csv."""
    from selfreplay.sweep import expand_jobs, job_status, load_experiment, run_sweep

    exp = load_experiment(experiment, scale, runs_dir)
    if dry_run:
        for job in expand_jobs(exp):
            click.echo(f"{job_status(job):12s} {job.key}")
        return
    result = run_sweep(exp, workers=workers, threads=threads, only=list(stages) or None, log=click.echo)
    if result.failed:
        raise SelfReplayError(f"{len(result.failed)} run(s) failed: " + "; ".join(
            f"{k}: {v}" for k, v in list(result.failed.items())[:3]))


@cli.command()
@click.argument("experiment")
@click.option("--scale", type=click.Choice(["cpu", "gpu", "paper"]), default="cpu", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True)
def report(experiment, scale, runs_dir) -> None:
    """Print an experiment's table (ours beside the paper's numbers) from its run directories."""
    from selfreplay.experiments import experiment_report

    click.echo(experiment_report(experiment, scale, runs_dir))


@cli.command()
@click.argument("experiment")
@click.option("--scale", type=click.Choice(["cpu", "gpu", "paper"]), default="cpu", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="PNG to write (default: RUNS_DIR/<name>/<scale>/<name>.png)")
def plot(experiment, scale, runs_dir, out) -> None:
    """Draw an experiment's figure (PNG)."""
    from selfreplay.experiments import experiment_plot

    click.echo(f"wrote {experiment_plot(experiment, scale, runs_dir, out)}")


# ---------------------------------------------------------------------------- commands from other modules


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one-line errors, non-zero exit codes."""
    try:
        cli.main(args=argv, prog_name="selfreplay", standalone_mode=False)
    except SelfReplayError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted (resume with --resume if checkpoint_every_tokens was set)", err=True)
        sys.exit(130)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        click.echo(f"error: {e.filename or ''}: {e.strerror}", err=True)
        sys.exit(2)
