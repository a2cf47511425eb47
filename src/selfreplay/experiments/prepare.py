"""The data a sweep needs, built when missing: the tokenizer and token corpora of an experiment's ``prepare`` block."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from selfreplay.errors import SelfReplayError


def prepare_data(prepare: dict, log: Callable[[str], None] = print) -> None:
    """Train the tokenizer and tokenize the corpora named in the experiment's ``prepare`` block, when missing."""
    from selfreplay.data.corpus import tokenize_corpus
    from selfreplay.data.tokenizer import train_tokenizer

    tok = prepare.get("tokenizer")
    if tok:
        out = Path(tok["out"])
        if not out.is_file():
            log(f"prepare: training tokenizer {out}")
            _check_inputs(tok["inputs"], "prepare.tokenizer")
            train_tokenizer(tok["inputs"], out, vocab_size=tok.get("vocab_size", 4096),
                            max_lines_per_file=tok.get("max_lines"), shuffle_seed=tok.get("shuffle_seed", 0))
    for name, spec in (prepare.get("corpora") or {}).items():
        out = Path(spec["out"])
        if (out / "meta.json").is_file():
            continue
        if not tok:
            raise SelfReplayError(f"prepare.corpora.{name}: needs prepare.tokenizer")
        log(f"prepare: tokenizing {name} -> {out}")
        _check_inputs(spec["inputs"], f"prepare.corpora.{name}")
        tokenize_corpus(spec["inputs"], tok["out"], out, spec["domain_token"], max_tokens=spec.get("max_tokens"),
                        shuffle_seed=spec.get("shuffle_seed"), name=spec.get("name", name), progress=False)


def _check_inputs(inputs: list, where: str) -> None:
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise SelfReplayError(f"{where}: input file {missing[0]} not found")
