"""One training loop for pretraining and finetuning, with the replay penalty of the paper.

    loss = NTP(downstream batch) + replay.coeff · term

where term is KL(teacher || student) or NTP on replay sequences (``kl`` / ``ntp``), KL on the downstream
batch (``kl_downstream``), or nothing (``none``; ``replace`` swaps replay rows into the batch instead).
The teacher is a frozen copy of the model at the start of finetuning.

The step never waits for the GPU just to log: losses accumulate on the device and are read at evaluations
(and every ``PROGRESS_EVERY`` steps for the progress bar).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from selfreplay import checkpoint as ckpt
from selfreplay.config import TrainConfig, config_to_dict, config_to_yaml, validate_train_config
from selfreplay.data import BatchLoader, Corpus
from selfreplay.errors import SelfReplayError
from selfreplay.losses import divergence_loss, next_token_loss
from selfreplay.metrics import MetricsLogger, evaluate, parameter_norms
from selfreplay.model import GPT, paper_param_count
from selfreplay.replay import CorpusReplay, ReplayBatch

PROGRESS_EVERY = 25


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked with a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SelfReplayError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SelfReplayError(f"device={name}: CUDA is not available on this machine")
    return device


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: bf16 autocast on CUDA by default, full precision on CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def sampling_precision(device: torch.device, precision: str) -> dict:
    """Sampler settings: on CUDA, bf16 autocast and bf16 KL targets kept from sampling (the paper's
    16x64x256x4096 buffer is 2 GiB), so the teacher is not run again; on CPU, fp32 targets kept while a buffer's
    fit in 1 GiB (the sampler's default), else recomputed."""
    if device.type != "cuda" or precision == "fp32":
        return {}
    return {"autocast_dtype": torch.bfloat16, "logprobs_dtype": torch.bfloat16, "max_logprobs_bytes": 8 << 30}


def init_model(model_cfg, seed: int) -> GPT:
    """A freshly initialised GPT; the same (config, seed) always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(model_cfg)


def lr_factor(step: int, tokens_per_step: int, warmup_tokens: int, schedule: str,
              total_steps: Optional[int]) -> float:
    """Multiplier of the peak LR after ``step`` optimizer steps: linear warmup by tokens, then constant/cosine."""
    warmup_steps = warmup_tokens / tokens_per_step
    if warmup_steps > 0 and step + 1 < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine" and total_steps:
        start = min(warmup_steps, total_steps - 1)
        progress = min(1.0, (step + 1 - start) / max(1.0, total_steps - start))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class TrainState:
    """Counters that a resumed run must restore."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    next_eval_tokens: int = 0
    next_checkpoint_tokens: int = 0
    best_valid: float = float("inf")
    evals_since_best: int = 0
    prev_loss_before: Optional[float] = None
    stop_reason: Optional[str] = None


@dataclass
class Setup:
    """Everything a run needs, built from the config."""

    model: GPT
    teacher: Optional[GPT]
    init_params: Optional[dict]
    loader: BatchLoader
    prev_loader: Optional[BatchLoader]
    replay: Optional[object]
    info: dict
    total_steps: Optional[int]
    tokens_per_step: int
    replay_rows: int = 0


class Trainer:
    """Runs one pretraining or finetuning job described by a :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig, finetune: bool, resume: bool = False,
                 on_step: Optional[Callable[[int], None]] = None):
        validate_train_config(cfg, finetune)
        self.cfg, self.finetune, self.resume, self.on_step = cfg, finetune, resume, on_step
        self.run_dir = Path(cfg.run_dir)
        self.device = resolve_device(cfg.device)
        self.autocast = autocast_for(self.device, cfg.precision)
        self.setup = self._build()
        self.model = self.setup.model
        self.student_fn = self._maybe_compile(self.model)
        self.teacher_fn = self._maybe_compile(self.setup.teacher) if self.setup.teacher is not None else None
        self.optimizer = self._make_optimizer()
        s = self.setup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, s.tokens_per_step, cfg.optim.warmup_tokens, cfg.optim.schedule, s.total_steps))
        self.state = TrainState()

    # ---------------------------------------------------------------- building
    def _build(self) -> Setup:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        teacher = init_params = prev_loader = None
        info: dict = {"kind": "finetune" if self.finetune else "pretrain", "git_commit": ckpt.git_commit()}
        if self.finetune:
            parent, parent_info = ckpt.load_model(cfg.init_from, "cpu")
            cfg.model = dataclasses.replace(parent.config)  # the checkpoint's architecture wins
            teacher = parent.to(self.device).eval().requires_grad_(False)
            model = copy.deepcopy(parent).train().requires_grad_(True)
            init_seed = parent_info.get("init_seed")
            if init_seed is not None:
                init_params = {k: v.to(self.device) for k, v in
                               init_model(cfg.model, init_seed).state_dict().items()}
            fingerprint = parent_info.get("tokenizer_fingerprint")
            info.update(init_from=os.path.abspath(cfg.init_from), init_seed=init_seed,
                        teacher_corpus=parent_info.get("train_corpus"))
        else:
            model = init_model(cfg.model, cfg.seed)
            init_params = {k: v.clone().to(self.device) for k, v in model.state_dict().items()}
            fingerprint, init_seed = None, cfg.seed
            info.update(init_seed=cfg.seed)
        model = model.to(self.device)
        if cfg.lora.r > 0:  # adapters only: the base weights freeze (merged back before saving)
            from selfreplay.lora import apply_lora

            info["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "merged": True, "layers": apply_lora(
                model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, seed=cfg.seed)}
        context, vocab = cfg.model.context, cfg.model.vocab_size

        corpus = Corpus.open(cfg.data.train, vocab_size=vocab, tokenizer_fingerprint=fingerprint)
        mix = Corpus.open(cfg.data.mix, vocab_size=vocab, tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint) \
            if cfg.data.mix and cfg.data.mix_fraction > 0 else None
        replay_rows = 0
        batch_rows = cfg.data.batch_size
        if cfg.replay.method == "replace":
            replay_rows = max(1, round(cfg.replay.fraction * cfg.data.batch_size))
            batch_rows = cfg.data.batch_size - replay_rows
        elif cfg.replay.method in ("kl", "ntp"):
            replay_rows = cfg.replay.batch_size
        loader = BatchLoader(corpus, context, batch_rows, cfg.data.valid_tokens, cfg.data.seed,
                             mix=mix, mix_fraction=cfg.data.mix_fraction, max_train_tokens=cfg.data.max_train_tokens)
        info.update(model=dataclasses.asdict(cfg.model), params=model.num_params(),
                    tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint,
                    train_corpus={"path": os.path.abspath(cfg.data.train), "name": corpus.meta.name,
                                  "domain_token": corpus.meta.domain_token, "valid_tokens": cfg.data.valid_tokens,
                                  "split_seed": cfg.data.seed})

        prev_spec = self._prev_corpus_spec(info)
        if prev_spec is not None:
            prev_corpus = Corpus.open(prev_spec["path"], vocab_size=vocab,
                                      tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint)
            prev_loader = BatchLoader(prev_corpus, context, max(1, replay_rows), prev_spec["valid_tokens"],
                                      prev_spec["split_seed"])
        replay = self._make_replay_source(teacher, prev_loader, prev_spec, replay_rows, context, info)

        tokens_per_step = cfg.data.batch_size * context
        total_steps = self._total_steps(loader, tokens_per_step, model)
        return Setup(model, teacher, init_params, loader, prev_loader, replay, info, total_steps, tokens_per_step,
                     replay_rows)

    def _prev_corpus_spec(self, info: dict) -> Optional[dict]:
        """The previous distribution: eval.prev if given, else the corpus the loaded checkpoint trained on."""
        if self.cfg.eval.prev:
            return {"path": self.cfg.eval.prev, "valid_tokens": self.cfg.data.valid_tokens,
                    "split_seed": self.cfg.data.seed}
        spec = info.get("teacher_corpus")
        if spec is None:
            return None
        if not Path(spec["path"]).is_dir():
            raise SelfReplayError(f"previous corpus {spec['path']} (recorded in {self.cfg.init_from}/run.json) is "
                                  f"missing; pass eval.prev=<corpus dir>")
        return spec

    def _make_replay_source(self, teacher, prev_loader, prev_spec, rows: int, context: int, info: dict):
        r = self.cfg.replay
        if r.method not in ("kl", "ntp", "replace"):
            return None
        if r.source == "prev":
            if prev_loader is None:
                raise SelfReplayError("replay.source=prev: the checkpoint records no training corpus; "
                                      "set replay.source to a corpus directory or 'self'")
            info["replay"] = {"source": "prev", "corpus": prev_spec["path"]}
            return CorpusReplay(prev_loader)
        if r.source == "self":
            from selfreplay.replay import SelfGeneratedReplay

            domains = list(r.domains) or [self._teacher_domain(info)]
            info["replay"] = {"source": "self", "domains": domains}
            return SelfGeneratedReplay(
                teacher, domains=domains, batch_size=rows, buffer=r.buffer, context=context,
                temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                eos_id=self._eos_id() if r.stop_at_eos else None, logprobs_top_k=r.logprobs_top_k,
                seed=self.cfg.seed, device=self.device, return_logprobs=r.method == "kl",
                **sampling_precision(self.device, self.cfg.precision))
        from selfreplay.replay import StoredReplay

        corpus = Corpus.open(r.source, vocab_size=self.cfg.model.vocab_size,
                             tokenizer_fingerprint=info["tokenizer_fingerprint"])
        info["replay"] = {"source": os.path.abspath(r.source)}
        return StoredReplay(corpus, batch_size=rows, context=context, seed=self.cfg.data.seed, shuffle=r.shuffle)

    def _teacher_domain(self, info: dict) -> int:
        spec = info.get("teacher_corpus")
        if not spec or spec.get("domain_token") is None:
            raise SelfReplayError("replay.source=self: the checkpoint records no domain token; set replay.domains")
        return int(spec["domain_token"])

    def _eos_id(self) -> int:
        corpus = Corpus.open(self.cfg.data.train)
        if corpus.meta.eos_token is None:
            raise SelfReplayError("replay.stop_at_eos=true: the training corpus records no EOS token")
        return int(corpus.meta.eos_token)

    def _total_steps(self, loader: BatchLoader, tokens_per_step: int, model: GPT) -> Optional[int]:
        stop = self.cfg.stop
        if stop.steps is not None:
            return stop.steps
        if stop.tokens is not None:
            return math.ceil(stop.tokens / tokens_per_step)
        if stop.tokens_per_param is not None:
            return math.ceil(stop.tokens_per_param * paper_param_count(model.config) / tokens_per_step)
        if stop.epochs is not None:
            return math.ceil(stop.epochs * loader.num_train_sequences / loader.main_rows)
        return None

    def _maybe_compile(self, model):
        if self.cfg.compile and self.device.type == "cuda":
            return torch.compile(model)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o, params = self.cfg.optim, [p for p in self.model.parameters() if p.requires_grad]
        if o.name == "sgd":
            return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, fused=fused)

    # ---------------------------------------------------------------- the step
    def compute_loss(self, tokens: torch.Tensor, replay: Optional[ReplayBatch]) -> tuple[torch.Tensor, dict]:
        """Total loss and its parts (tensors, not synchronised)."""
        r = self.cfg.replay
        if r.method == "replace":
            tokens = torch.cat((replay.tokens.to(self.device), tokens))
            replay = None
        if replay is None:
            logits = self.student_fn(tokens)
            downstream_logits, replay_logits = logits, None
        else:
            replay_tokens = replay.tokens.to(self.device, non_blocking=True)
            logits = self.student_fn(torch.cat((tokens, replay_tokens)))  # one pass for both batches
            downstream_logits, replay_logits = logits[: len(tokens)], logits[len(tokens):]
        ntp = next_token_loss(downstream_logits, tokens)
        parts = {"ntp": ntp.detach()}
        if r.method in ("none", "replace"):
            return ntp, parts
        if r.method == "ntp":
            term = next_token_loss(replay_logits, replay_tokens, self._mask(replay))
        elif r.method == "kl":
            targets = replay.teacher_logprobs
            if targets is None:
                with torch.no_grad():
                    targets = torch.log_softmax(self.teacher_fn(replay_tokens).float(), dim=-1)
            elif isinstance(targets, torch.Tensor):
                targets = targets.to(self.device, non_blocking=True)
            else:
                targets = targets.to(self.device)
            term = divergence_loss(replay_logits, targets, replay_tokens.shape, self._mask(replay), r.divergence,
                                   r.jsd_beta)
        else:  # kl_downstream: distil the teacher on the new inputs (Learning without Forgetting)
            with torch.no_grad():
                targets = torch.log_softmax(self.teacher_fn(tokens).float(), dim=-1)
            term = divergence_loss(downstream_logits, targets, tokens.shape, None, r.divergence, r.jsd_beta)
        parts["replay"] = term.detach()
        return ntp + r.coeff * term, parts

    def _mask(self, replay: ReplayBatch) -> Optional[torch.Tensor]:
        return None if replay.loss_mask is None else replay.loss_mask.to(self.device)

    def train_step(self) -> dict:
        tokens = self.setup.loader.next_batch().to(self.device, non_blocking=True)
        replay = self.setup.replay.next_batch() if self.setup.replay is not None else None
        with self.autocast():
            loss, parts = self.compute_loss(tokens, replay)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"] = loss.detach()
        return parts

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Validation and previous-distribution metrics (the model is left in train mode)."""
        cfg, s = self.cfg, self.setup
        teacher = self.teacher_fn
        out: dict = {}
        valid = evaluate(self.student_fn, s.loader.valid_batches(cfg.eval.batch_size, cfg.eval.max_tokens),
                         teacher, self.device, self.autocast)
        valid.pop("teacher_loss", None)
        out.update({f"valid_{k}": v for k, v in valid.items()})
        if s.prev_loader is not None:
            prev = evaluate(self.student_fn, s.prev_loader.valid_batches(cfg.eval.batch_size, cfg.eval.max_tokens),
                            teacher, self.device, self.autocast)
            if self.state.prev_loss_before is None:  # the unmodified teacher's loss (the model's before training)
                self.state.prev_loss_before = prev.get("teacher_loss", prev["loss"])
            prev.pop("teacher_loss", None)
            out.update({f"prev_{k}": v for k, v in prev.items()})
            out["forgetting"] = out["prev_loss"] - self.state.prev_loss_before
        weights = self.model
        if cfg.lora.r > 0:  # norms and drift of the merged weights, under the base names
            from selfreplay.lora import MergedView

            weights = MergedView(self.model)
        out.update(parameter_norms(weights, s.teacher, s.init_params))
        return out

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        cfg, s = self.cfg, self.setup
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._restore()
        elif (self.run_dir / ckpt.TRAIN_STATE).exists() or (self.run_dir / ckpt.WEIGHTS).exists():
            raise SelfReplayError(f"run_dir {self.run_dir} already holds a run; use --resume or another run_dir")
        else:
            self.state.next_checkpoint_tokens = cfg.checkpoint_every_tokens or 0
        st = self.state
        ckpt.atomic_write(self.run_dir / ckpt.CONFIG, config_to_yaml(cfg))
        logger = MetricsLogger(self.run_dir, cfg.log.wandb, cfg.log.wandb_project, cfg.log.tensorboard,
                               config_to_dict(cfg), keep_until_tokens=st.tokens if self.resume else None)
        bar = tqdm(total=s.total_steps, initial=st.step, disable=not cfg.log.progress, unit="step",
                   desc=f"{s.info['kind']} {self.run_dir.name}", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        steps_since_eval = 0
        last_record: dict = {}
        try:
            if st.step == 0 and not self.resume:
                last_record = self._log_eval(logger, sums, 0)
            tick = time.perf_counter()
            while st.stop_reason is None:
                parts = self.train_step()
                st.step += 1
                st.tokens += s.tokens_per_step
                steps_since_eval += 1
                for k, v in parts.items():
                    sums[k] = sums[k] + v if k in sums else v
                if self.on_step is not None:
                    self.on_step(st.step)
                if st.step % PROGRESS_EVERY == 0:
                    bar.set_postfix(loss=f"{(sums['loss'] / steps_since_eval).item():.3f}", refresh=False)
                bar.update(1)
                st.stop_reason = self._length_or_time_stop(time.perf_counter() - tick)
                if st.tokens >= st.next_eval_tokens or st.stop_reason is not None:
                    st.train_time += self._elapsed(tick)
                    last_record = self._log_eval(logger, sums, steps_since_eval)
                    sums, steps_since_eval = {}, 0
                    tick = time.perf_counter()
                if cfg.checkpoint_every_tokens and st.tokens >= st.next_checkpoint_tokens \
                        and st.stop_reason is None:
                    st.train_time += self._elapsed(tick)
                    self._save_train_state()
                    tick = time.perf_counter()
        except KeyboardInterrupt:
            if cfg.checkpoint_every_tokens:
                self._save_train_state()
            raise
        finally:
            bar.close()
            logger.close()
        summary = {**last_record, "stop_reason": st.stop_reason, "steps": st.step, "tokens": st.tokens,
                   "train_time": st.train_time, "best_valid_loss": st.best_valid,
                   "prev_loss_before": st.prev_loss_before}
        info = {**s.info, "steps": st.step, "tokens": st.tokens}
        if cfg.lora.r > 0:  # the checkpoint stays a plain GPT
            from selfreplay.lora import merge_lora

            merge_lora(self.model)
        ckpt.save_run(self.run_dir, self.model, config_to_yaml(cfg), info, summary)
        shutil.rmtree(self.run_dir / ckpt.TRAIN_STATE, ignore_errors=True)
        return summary

    def _elapsed(self, tick: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tick

    def _length_or_time_stop(self, running: float) -> Optional[str]:
        st, stop = self.state, self.cfg.stop
        if self.setup.total_steps is not None and st.step >= self.setup.total_steps:
            return "length"
        if stop.max_time is not None and st.train_time + running >= stop.max_time:
            return "max_time"
        return None

    def _log_eval(self, logger: MetricsLogger, sums: dict, steps: int) -> dict:
        st, cfg = self.state, self.cfg
        record = {"step": st.step, "tokens": st.tokens, "epoch": self.setup.loader.epochs_done,
                  "train_time": st.train_time, "lr": self.scheduler.get_last_lr()[0]}
        if steps:
            record.update({f"train_{k}": (v / steps).item() for k, v in sums.items()})
            record["tokens_per_s"] = st.tokens / st.train_time if st.train_time > 0 else None
        if self.setup.replay is not None:
            record["replay_sample_time"] = self.setup.replay.sample_seconds
        record.update(self.evaluate())
        logger.log(record)
        st.next_eval_tokens = st.tokens + cfg.eval.every_tokens
        valid = record["valid_loss"]
        if valid < st.best_valid:
            st.best_valid, st.evals_since_best = valid, 0
        elif st.step > 0:
            st.evals_since_best += 1
        if st.stop_reason is None and st.step > 0:
            if cfg.stop.target_loss is not None and valid <= cfg.stop.target_loss:
                st.stop_reason = "target_loss"
            elif cfg.stop.early_stop_evals is not None and st.evals_since_best >= cfg.stop.early_stop_evals:
                st.stop_reason = "early_stop"
        return record

    # ---------------------------------------------------------------- resumable state
    def _save_train_state(self) -> None:
        st = self.state
        st.next_checkpoint_tokens = st.tokens + (self.cfg.checkpoint_every_tokens or 0)
        state = {"config": config_to_dict(self.cfg), "counters": dataclasses.asdict(st),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "loader": self.setup.loader.state_dict(),
                 "replay": self.setup.replay.state_dict() if self.setup.replay is not None else None,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        ckpt.save_train_state(self.run_dir, self.model, state)

    def _restore(self) -> None:
        state = ckpt.load_train_state(self.run_dir, self.model)
        saved, current = state["config"], config_to_dict(self.cfg)
        diff = _first_difference(saved, current, ignore=("log", "stop", "checkpoint_every_tokens", "eval"))
        if diff:
            raise SelfReplayError(f"--resume: config differs from the interrupted run's at '{diff}'")
        self.state = TrainState(**state["counters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.setup.loader.load_state_dict(state["loader"])
        if self.setup.replay is not None and state["replay"] is not None:
            self.setup.replay.load_state_dict(state["replay"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _first_difference(a, b, ignore=(), prefix="") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if not prefix and k in ignore:
                continue
            d = _first_difference(a.get(k), b.get(k), (), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def train(cfg: TrainConfig, finetune: bool = False, resume: bool = False,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Run a pretraining (``finetune=False``) or finetuning job; returns the final summary."""
    return Trainer(cfg, finetune, resume, on_step).run()
