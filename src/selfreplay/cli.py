"""The ``selfreplay`` command line: a thin layer over the library.

Every command turns bad input into one line on stderr and exit code 2 (see :func:`main`); torch and transformers
are imported only by the command that runs, so ``--help`` is instant.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import click

from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, describe_config, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep import SCALES as EXPERIMENT_SCALES

CONFIG_HELP = "\b\nCONFIG: YAML files and key.sub=value overrides, applied in order. Keys and defaults:\n\n\b\n"
THREADS = click.option("--threads", type=int, default=None,
                       help="CPU threads (default: OMP_NUM_THREADS, else by the work per forward pass and the free "
                            "cores)")


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and infinity (click's FLOAT and FloatRange accept "nan")."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE = FiniteFloat()
SCALES = click.Choice(list(EXPERIMENT_SCALES))  # an experiment file's presets


def _split_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Separate YAML config files from key=value overrides (a config file's path may hold '=', as sweep runs' do)."""
    is_file = [("=" not in a) or (a.endswith((".yaml", ".yml")) and os.path.isfile(a)) for a in args]
    return [a for a, f in zip(args, is_file) if f], [a for a, f in zip(args, is_file) if not f]


def _threads(threads: Optional[int], device: str, models=(), tokens_per_forward: Optional[int] = None) -> None:
    """CPU threads of a command that evaluates or samples: ``--threads``, else the rule of selfreplay.threads with
    the forward FLOPs of the largest model (2 x parameters x tokens; unknown: as many as are free)."""
    if threads is not None and threads < 1:
        raise SelfReplayError(f"--threads={threads}: must be positive")
    import torch

    if not (device == "cpu" or (device == "auto" and not torch.cuda.is_available())):
        return
    from selfreplay.models import saved_param_count
    from selfreplay.threads import decide_threads, env_threads

    counts = [saved_param_count(m) for m in models if m]
    known = counts and None not in counts and tokens_per_forward is not None
    flops = 0 if tokens_per_forward == 0 else 2 * max(counts) * tokens_per_forward if known else None
    torch.set_num_threads(decide_threads(flops, fixed=threads or env_threads()))


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
    from selfreplay.data.tokenizer import train_tokenizer

    tok = train_tokenizer(list(inputs), out, vocab_size=vocab_size, max_lines_per_file=max_lines,
                          shuffle_seed=shuffle_seed, text_field=text_field, progress=sys.stderr.isatty(),
                          echo=None if sys.stderr.isatty() else click.echo)
    click.echo(f"wrote {out} (vocab {tok.get_vocab_size()})")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(), help="tokenizer JSON file")
@click.option("--out", required=True, type=click.Path(),
              help="corpus directory to write (new or empty; an earlier corpus there is replaced)")
@click.option("--domain-token", type=int, required=True, help="reserved id 0-9 written at position 0 of every sequence")
@click.option("--max-tokens", type=int, default=None, help="keep only the first N tokens")
@click.option("--shuffle-seed", type=int, default=None, help="shuffle documents (lines) with this seed first")
@click.option("--name", default=None, help="corpus name recorded in its metadata (default: directory name)")
@click.option("--text-field", default="text", show_default=True, help="field holding the text in .jsonl/.parquet")
def tokenize(inputs, tokenizer_path, out, domain_token, max_tokens, shuffle_seed, name, text_field) -> None:
    """Tokenize INPUTS into a corpus directory (tokens.bin + meta.json), each document followed by EOS."""
    from selfreplay.data.corpus import tokenize_corpus

    meta = tokenize_corpus(list(inputs), tokenizer_path, out, domain_token, max_tokens=max_tokens,
                           shuffle_seed=shuffle_seed, text_field=text_field, name=name)
    click.echo(f"wrote {out}: {meta.num_tokens:,} tokens ({meta.dtype}), domain token {meta.domain_token}")


# ---------------------------------------------------------------------------- training
def _train_command(command: str):
    @click.argument("config", nargs=-1)
    @click.option("--resume", is_flag=True, help="continue the interrupted run in run_dir from its last checkpoint "
                                                 "(its saved config is used; overrides may not change the run)")
    def run(config: tuple[str, ...], resume: bool) -> None:
        from selfreplay.train import train
        from selfreplay.train.distributed import is_main, shutdown

        files, overrides = _split_args(config)
        cfg = _resume_config(files, overrides) if resume else load_config(TrainConfig, files, overrides)
        try:
            summary = train(cfg, command, resume=resume)
            main_rank = is_main()
        finally:
            shutdown()
        if main_rank:
            keys = ["valid_loss", "valid_accuracy", "prev_loss", "forgetting", "prev_kl", "target_kl", "replay_coeff",
                    "replay_kl_smoothed", "best_step", "steps", "tokens", "train_time", "stop_reason"]
            if summary.get("target_kl") is None:  # a fixed coefficient is the config's; a budget's final one is news
                keys.remove("replay_coeff")
            click.echo(" ".join(f"{k}={_fmt(summary[k])}" for k in keys if summary.get(k) is not None))
            click.echo(f"saved {cfg.run_dir}" + (f"; pushed {summary['hub_url']}" if summary.get("hub_url") else ""))

    run.__doc__ = ("Pretrain the built-in GPT from scratch on a token corpus." if command == PRETRAIN else
                   "Finetune a model (model.model_name_or_path: a selfreplay run, a Hugging Face directory or hub "
                   "id) with the replay penalty against forgetting. Multi-GPU: torchrun --nproc_per_node N -m "
                   "selfreplay finetune ...")
    run.__doc__ += "\n\n" + CONFIG_HELP + describe_config(TrainConfig, command)
    return cli.command(command)(run)


def _resume_config(files: list[str], overrides: list[str]) -> TrainConfig:
    """``--resume``: the interrupted run's saved config (found through run_dir), then the given overrides."""
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), None)
    if files:
        return load_config(TrainConfig, files, overrides)
    if not run_dir:
        raise SelfReplayError("--resume: give run_dir=<the interrupted run's directory>")
    saved = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise SelfReplayError(f"--resume: run_dir {run_dir}: not found (no such directory)")
    if not saved.is_file():
        raise SelfReplayError(f"--resume: {saved}: not found (the run's saved config); give the run's config files "
                              f"and overrides again with --resume, or start afresh in a new run_dir")
    cfg = load_config(TrainConfig, [str(saved)], overrides)
    cfg.run_dir = run_dir  # the directory may have been moved or copied
    return cfg


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_train_command(PRETRAIN)
_train_command(FINETUNE)


# ---------------------------------------------------------------------------- evaluation
@cli.command("eval")
@click.argument("models", nargs=-1)
@click.option("--model", "more_models", multiple=True, help="a model to evaluate (a run directory, a Hugging Face "
                                                            "directory or hub id); repeat, or give them as MODELS")
@click.option("--corpus", "corpora", multiple=True, help="token corpus (built-in GPT; its held-out split); repeat")
@click.option("--data", "data_files", multiple=True, help="text / chat records to score (Hugging Face); repeat")
@click.option("--teacher", default=None, help="reference model (default: the model each run started from)")
@click.option("--mcq", "mcq_files", multiple=True, help="multiple-choice question file (.jsonl; repeat)")
@click.option("--mcq-format", type=click.Choice(["auto", "chat", "plain"]), default="auto", show_default=True,
              help="question prompts in chat format (auto: when the tokenizer has a chat template)")
@click.option("--lm-eval", "lm_eval_tasks", default=None,
              help="comma-separated lm-evaluation-harness tasks (needs lm_eval installed)")
@click.option("--self", "self_sequences", type=int, default=None,
              help="data-free forgetting: KL(teacher || model) per token on this many sequences the teacher samples "
                   "itself (as self-generated replay), with a 95% bootstrap interval")
@click.option("--self-length", type=int, default=None, help="--self: tokens per sequence (default: the built-in "
                                                            "GPT's context / 512)")
@click.option("--prompt", type=click.Choice(["bos", "chat"]), default="bos", show_default=True,
              help="--self, Hugging Face: prompt the teacher with BOS or the chat template's prefix")
@click.option("--domain", "domains", type=int, multiple=True,
              help="--self, built-in GPT: domain token to prompt with (default: the teacher's corpus's)")
@click.option("--seed", type=int, default=0, show_default=True, help="--self: sampling and bootstrap seed")
@click.option("--valid-tokens", type=int, default=None,
              help="--corpus split size (default: as recorded by the run that trained on the corpus, else 1M)")
@click.option("--split-seed", type=int, default=None, help="--corpus split seed (default: as recorded, else 0)")
@click.option("--max-tokens", type=int, default=None, help="score at most about this many tokens per data set")
@click.option("--batch-size", type=int, default=8, show_default=True, help="rows per forward pass")
@click.option("--seq-len", type=int, default=512, show_default=True, help="--data: tokens per row")
@click.option("--split", default="test", show_default=True, help="--data/--mcq: split of hub datasets")
@click.option("--text-field", default="text", show_default=True, help="--data: field holding plain text")
@click.option("--dtype", default="auto", show_default=True, help="Hugging Face weights dtype (auto, float32, ...)")
@click.option("--device", default="auto", show_default=True)
@THREADS
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also write the results")
def eval_command(models, more_models, corpora, data_files, teacher, mcq_files, mcq_format, lm_eval_tasks,
                 self_sequences, self_length, prompt, domains, seed, valid_tokens, split_seed, max_tokens, batch_size,
                 seq_len, split, text_field, dtype, device, threads, json_out) -> None:
    """How much each model forgot: loss and KL(teacher || model) on held-out data, and benchmark accuracy."""
    from selfreplay.evaluate.report import benchmark_report, format_benchmarks, forgetting_report, format_report
    from selfreplay.train.files import atomic_write_json

    names = list(models) + list(more_models)
    if not names:
        raise SelfReplayError("eval: give the models to evaluate (run directories, Hugging Face directories or ids)")
    if batch_size < 1:
        raise SelfReplayError(f"eval --batch-size={batch_size}: must be positive")
    _threads(threads, device, [*names, teacher], batch_size * seq_len)
    tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    if not (corpora or data_files or mcq_files or tasks or self_sequences is not None):
        raise SelfReplayError("eval: nothing to evaluate; give --corpus, --data, --self, --mcq and/or --lm-eval")
    results: dict = {}
    if self_sequences is not None:
        from selfreplay.evaluate.self_kl import format_self_kl, self_kl_report

        results["self_kl"] = self_kl_report(names, self_sequences, teacher, self_length, prompt, domains, batch_size,
                                            seed, device, dtype)
        click.echo(format_self_kl(results["self_kl"]))
    if corpora or data_files:
        rows = forgetting_report(names, corpora, data_files, teacher, valid_tokens, split_seed, max_tokens,
                                 batch_size, seq_len, split, text_field, device, dtype)
        click.echo(format_report(rows))
        results["rows"] = rows
        if self_sequences is not None:
            from selfreplay.evaluate.self_kl import compare_with_held_out

            for line in compare_with_held_out(results["self_kl"], rows):
                click.echo(line)
    if mcq_files or tasks:
        results["benchmarks"] = [benchmark_report(n, mcq_files, tasks, batch_size, split, mcq_format, device=device,
                                                  dtype=dtype) for n in names]
        click.echo(format_benchmarks({"mcq": [r for b in results["benchmarks"] for r in b["mcq"]],
                                      "lm_eval": {k: v for b in results["benchmarks"] for k, v in
                                                  b["lm_eval"].items()}}))
    if json_out:
        atomic_write_json(json_out, results["rows"] if list(results) == ["rows"] else results)


# ---------------------------------------------------------------------------- self-generated replay
@cli.command()
@click.argument("model", required=False)
@click.option("--model", "model_opt", default=None, help="the model to sample from (as MODEL)")
@click.option("--out", required=True, type=click.Path(), help="replay corpus directory to write")
@click.option("--num-sequences", type=int, required=True, help="number of sequences to sample")
@click.option("--length", type=int, default=None, help="tokens per sequence, prompt included (default: the built-in "
                                                       "GPT's context; 512 for Hugging Face models)")
@click.option("--domain", "domains", type=int, multiple=True,
              help="built-in GPT: domain token to prompt with (repeat to split rows; default: its corpus's)")
@click.option("--prompt", type=click.Choice(["bos", "chat"]), default="bos", show_default=True,
              help="Hugging Face: prompt with BOS only (the paper's) or the chat template's prefix")
@click.option("--batch-size", type=int, default=64, show_default=True, help="sequences sampled at once")
@click.option("--temperature", type=FINITE, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
@click.option("--top-p", type=FINITE, default=None, help="nucleus sampling threshold")
@click.option("--stop-at-eos", is_flag=True, help="built-in GPT: end samples at EOS (padded, masked)")
@click.option("--logprobs-top-k", type=int, default=None,
              help="also store the teacher's top-k log-probs per position (KL targets without a teacher pass)")
@click.option("--text", "text_out", type=click.Path(dir_okay=False), default=None,
              help="also write the decoded samples as JSONL (one {\"text\": ...} per sequence)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="Hugging Face weights dtype")
@click.option("--device", default="auto", show_default=True)
@THREADS
@click.option("--no-resume", is_flag=True, help="discard chunks left by an interrupted run instead of continuing")
def generate(model, model_opt, out, num_sequences, length, domains, prompt, batch_size, temperature, top_k, top_p,
             stop_at_eos, logprobs_top_k, text_out, seed, dtype, device, threads, no_resume) -> None:
    """Sample a replay corpus from a model, for `finetune` with replay.source=<dir>."""
    from selfreplay.replay.store import generate_from

    name = model or model_opt
    if not name:
        raise SelfReplayError("generate: give the MODEL to sample from (a run directory, a Hugging Face directory "
                              "or hub id)")
    if text_out and Path(out).resolve() in (Path(text_out).resolve(), *Path(text_out).resolve().parents):
        raise SelfReplayError(f"generate --text={text_out}: would be written into the corpus directory --out={out}; "
                              f"write the decoded text elsewhere")
    _threads(threads, device, [name], batch_size)  # a decoding step: one token per row
    meta = generate_from(name, out, num_sequences, length, list(domains), prompt, batch_size, temperature,
                            top_k, top_p, stop_at_eos, logprobs_top_k, seed, dtype, device, not no_resume, text_out)
    click.echo(f"wrote {out}: {meta.num_tokens // meta.sequence_length:,} sequences of {meta.sequence_length} tokens"
               + (f"; decoded text in {text_out}" if text_out else ""))


@cli.command("replay-stats")
@click.argument("replay")
@click.option("--teacher", default=None, help="model to score the replay with (teacher NLL per token)")
@click.option("--real", default=None, help="real corpus directory for n-gram overlap")
@click.option("--max-sequences", type=int, default=None, help="use at most this many replay sequences")
@click.option("--device", default="auto", show_default=True)
@THREADS
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="where to save the numbers (default: REPLAY-stats.json beside the corpus)")
def replay_stats_command(replay, teacher, real, max_sequences, device, threads, json_out) -> None:
    """Quality of a replay corpus: teacher NLL, distinct-n, domain coverage, overlap with real data."""
    from selfreplay.evaluate.replay_stats import format_replay_stats, replay_stats
    from selfreplay.models import load_model
    from selfreplay.train.distributed import resolve_device
    from selfreplay.train.files import atomic_write_json

    _threads(threads, device, [teacher] if teacher else [], None if teacher else 0)  # no teacher: no model work
    dev = resolve_device(device)
    teacher_model = load_model(teacher, dev).eval() if teacher else None
    stats = replay_stats(replay, teacher=teacher_model, real=real, max_sequences=max_sequences, device=dev)
    click.echo(format_replay_stats(stats))
    json_out = json_out or str(Path(replay).resolve()) + "-stats.json"
    atomic_write_json(json_out, stats)
    click.echo(f"saved {json_out}")


# ---------------------------------------------------------------------------- speed
@cli.command()
@click.argument("overrides", nargs=-1)
@click.option("--model", default=None, help="a Hugging Face model (hub id, directory, or llama-tiny / llama-small / "
                                            "llama-1b with random weights); default: the built-in GPT")
@click.option("--methods", default="plain,kl_real,kl_self,sampling", show_default=True,
              help="comma-separated: plain, kl_real, kl_self, sampling (sampled tokens/s of the replay sampler)")
@click.option("--steps", type=int, default=5, show_default=True, help="timed steps per method")
@click.option("--warmup", type=int, default=2, show_default=True, help="untimed steps first (compilation)")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="run the methods this many times, interleaved, and report the median round and every round")
@click.option("--no-isolate", is_flag=True, help="run every method in this process (peak memory is then less clean)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="also save results as JSON")
def bench(overrides, model, methods, steps, warmup, rounds, no_isolate, json_out) -> None:
    """Time and peak memory of the training step: plain vs KL on real vs KL on self-generated replay (built-in GPT:
    GFLOP/s and its share of an fp32 matmul timed in the same process), and the CPU or GPU it ran on. OVERRIDES are
    finetuning settings (key=value; a CPU defaults to batch 16, replay 4 rows, buffer 16; kl_self is timed over
    whole refills)."""
    from selfreplay.experiments.bench import format_bench, run_bench
    from selfreplay.train.files import atomic_write_json

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    results = run_bench(chosen, model, list(overrides), steps, warmup, isolate=not no_isolate, rounds=rounds)
    click.echo(format_bench(results))
    if json_out:
        atomic_write_json(json_out, results)


# ---------------------------------------------------------------------------- the demo
@cli.command()
@click.option("--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="directory for demo.png, metrics.jsonl, results.json and results.md (new, empty or an earlier "
                   "demo's: a rerun replaces only its own files)")
@click.option("--full", is_flag=True, help="the paper's configuration (d_model 256, batch 2048, 2000 steps/task; GPU)")
@click.option("--method", type=click.Choice(["ntp", "kl"]), default=None,
              help="replay penalty of the 'with replay' run (default: kl on the CPU preset, ntp with --full as the "
                   "paper's toy)")
@click.option("--source", type=click.Choice(["self", "real"]), default="self", show_default=True,
              help="replay data: the model's own samples or the real earlier tasks")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--steps-per-task", type=int, default=None, help="steps of every task, the first included")
@click.option("--eval-every", type=int, default=None, help="override the preset's evaluation interval (steps)")
@click.option("--threads", type=int, default=None, help="CPU threads per run (default: OMP_NUM_THREADS, else by "
                                                        "the work per step and the free cores shared by the two runs "
                                                        "going side by side)")
def demo(out_dir, full, method, source, seed, device, steps_per_task, eval_every, threads) -> None:
    """Four arithmetic tasks learned one after another, without and with self-generated replay (paper §5.2)."""
    from selfreplay.experiments.demo import run_demo

    run_demo(out_dir, full=full, method=method, source=source, seed=seed, device=device,
             steps_per_task=steps_per_task, eval_every=eval_every, echo=click.echo, threads=threads)


# ---------------------------------------------------------------------------- experiment sweeps
@cli.command()
@click.argument("experiment")
@click.option("--scale", type=SCALES, default="cpu", show_default=True,
              help="preset of the experiment file")
@click.option("--workers", type=int, default=None, help="parallel runs (default: the number of CPU cores)")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run")
@click.option("--stage", "stages", multiple=True, help="run only these stages (repeat); finished runs are reused")
@click.option("--runs-dir", default="runs", show_default=True, help="runs go to RUNS_DIR/<name>/<scale>/")
@click.option("--dry-run", is_flag=True, help="list the runs and their status, train nothing")
@click.option("--status", "show_status", is_flag=True,
              help="print every run's state (done, running, pending, failed and why) from the run directories")
@click.option("--launcher", default=None, help="local (default), slurm or ray: where the runs train (overrides the "
                                               "experiment file's launcher.name)")
@click.option("--partition", default=None, help="slurm: the partition")
@click.option("--time-min", type=int, default=None, help="slurm: time limit of one job in minutes (then requeued)")
@click.option("--cpus-per-run", type=int, default=None, help="slurm / ray: CPUs of one run (default: --threads)")
@click.option("--gpus-per-run", type=int, default=None, help="slurm / ray: GPUs of one run")
@click.option("--tasks-per-run", type=int, default=None, help="slurm: processes of one run (DDP / FSDP2)")
@click.option("--array-parallelism", type=int, default=None, help="slurm: runs of one job array at once")
@click.option("--ray-address", default=None, help="ray: the cluster to join (auto, or host:port)")
def sweep(experiment, scale, workers, threads, stages, runs_dir, dry_run, show_status, launcher, partition, time_min,
          cpus_per_run, gpus_per_run, tasks_per_run, array_parallelism, ray_address) -> None:
    """Run an experiment grid (experiments/<name>.yaml or a YAML path): skip finished runs, resume interrupted
    ones, then write results.csv and results_trajectories.csv. Runs train here, on a SLURM cluster or on a Ray
    cluster (--launcher; docs/clusters.md)."""
    from selfreplay.experiments.launchers import launcher_settings
    from selfreplay.experiments.sweep import expand_jobs, job_status, load_experiment, run_sweep

    for name, value in (("--workers", workers), ("--threads", threads)):
        if value is not None and value < 1:
            raise SelfReplayError(f"sweep {name}={value}: must be positive")
    exp = load_experiment(experiment, scale, runs_dir)
    if show_status:
        from selfreplay.experiments.status import format_status, sweep_status

        click.echo(format_status(exp, sweep_status(exp)))
        return
    if dry_run:
        for job in expand_jobs(exp):
            click.echo(f"{job_status(job):12s} {job.key}")
        return
    settings = launcher_settings(exp.launcher, name=launcher, partition=partition, time_min=time_min,
                                 cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, tasks_per_run=tasks_per_run,
                                 array_parallelism=array_parallelism, ray_address=ray_address)
    result = run_sweep(exp, workers=workers, threads=threads, only=list(stages) or None, log=click.echo,
                       launcher=settings)
    if result.failed:
        raise SelfReplayError(f"{len(result.failed)} run(s) failed: " + "; ".join(
            f"{k}: {v}" for k, v in list(result.failed.items())[:3]))


@cli.command()
@click.argument("experiment")
@click.option("--scale", type=SCALES, default="cpu", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True)
def report(experiment, scale, runs_dir) -> None:
    """Print an experiment's table (ours beside the paper's numbers) from its run directories."""
    from selfreplay.experiments.reports import experiment_report

    click.echo(experiment_report(experiment, scale, runs_dir))


@cli.command()
@click.argument("experiment")
@click.option("--scale", type=SCALES, default="cpu", show_default=True)
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="PNG to write (default: RUNS_DIR/<name>/<scale>/<name>.png)")
def plot(experiment, scale, runs_dir, out) -> None:
    """Draw an experiment's figure (PNG)."""
    from selfreplay.experiments.reports import experiment_plot

    click.echo(f"wrote {experiment_plot(experiment, scale, runs_dir, out)}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one-line errors and non-zero exit codes, never a traceback for bad input or bad luck."""
    from selfreplay.allocator import keep_freed_memory
    from selfreplay.train.files import disk_full

    keep_freed_memory()
    try:
        cli.main(args=argv, prog_name="selfreplay", standalone_mode=False)
    except SelfReplayError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted (a second Ctrl-C stops without a checkpoint; --resume continues from the last one)",
                   err=True)
        sys.exit(130)
    except OSError as e:
        if disk_full(e):
            click.echo(f"error: no space left on the device writing {e.filename or 'a file'}; nothing half-written "
                       f"was kept: free space and run again (--resume continues a training run)", err=True)
        else:
            click.echo(f"error: {e.filename or ''}: {e.strerror or e}", err=True)
        sys.exit(2)
