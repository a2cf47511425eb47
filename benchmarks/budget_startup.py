"""The forgetting budget's start-up on a tiny real finetune (docs/budget.md): the test suite's d32 model, pretrained
on one synthetic Markov "language", finetuned on another for 300 steps at a constant LR (4-step warmup) from c = 10,
with KL self-replay and targets 0.01 / 0.05 / 0.2 nats per token, and at a fixed c = 10 for reference.
Prints per run: the replay KL's largest 5-step mean over its target after the first 10% of the steps, its mean over
the last 30 steps over the target, the final c and the new-data loss. CPU, ~1-2 min:

    python benchmarks/budget_startup.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's synthetic corpora

from conftest import make_corpus, tiny_overrides  # noqa: E402
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, load_config  # noqa: E402
from selfreplay.train import train  # noqa: E402

STEPS, TARGETS = 300, (0.01, 0.05, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="a new directory for the runs (default: a temporary one)")
    out = Path(parser.parse_args().out or tempfile.mkdtemp(prefix="budget_startup_"))
    en, es = make_corpus(out / "en", seed=1, domain=0), make_corpus(out / "es", seed=2, domain=1)
    teacher = out / "pretrain"
    train(load_config(TrainConfig, [], tiny_overrides(teacher, en, **{"stop.steps": 150})), PRETRAIN)
    print(f"{'run':<12} {'max KL/target':>14} {'end KL/target':>14} {'final c':>9} {'new-data loss':>14}")
    for target in (None, *TARGETS):
        name = "fixed c=10" if target is None else f"target {target:g}"
        extra = {} if target is None else {"replay.target_kl": target}
        args = tiny_overrides(out / name.replace(" ", "_"), es, **{
            "model.model_name_or_path": teacher, "replay.source": "self", "replay.coeff": 10.0,
            "stop.steps": STEPS, "optim.warmup_tokens": 4 * 16 * 16, "optim.schedule": "constant",
            "log.every_steps": 5, "eval.every_steps": STEPS, **extra})
        summary = train(load_config(TrainConfig, [], args), FINETUNE)
        lines = (out / name.replace(" ", "_") / "metrics.jsonl").read_text().splitlines()
        kls = [(r["step"], r["train_replay"]) for r in map(json.loads, lines) if r.get("event") == "train"]
        reference = target or kls[-1][1]
        after = [kl for step, kl in kls if step > STEPS // 10]
        end = [kl for step, kl in kls if step > STEPS - 30]
        print(f"{name:<12} {max(after) / reference:>14.2f} {sum(end) / len(end) / reference:>14.2f} "
              f"{summary['replay_coeff']:>9.3g} {summary['valid_loss']:>14.3f}")


if __name__ == "__main__":
    main()
