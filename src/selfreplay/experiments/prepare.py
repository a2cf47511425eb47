"""The data a sweep needs, built when missing: the tokenizer and token corpora of an experiment's ``prepare`` block.

Each output records the recipe it was built from (inputs, sizes, seeds, the tokenizer's fingerprint) in a
``recipe.json`` beside it. An output whose recipe differs is rebuilt; one without a recipe (made by hand or by an
earlier version) is kept only if what its metadata says matches the recipe, and otherwise refused — so corpora left
by an earlier, smaller quick start are never silently reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from selfreplay.errors import SelfReplayError
from selfreplay.train.files import atomic_write_json

RECIPE = "recipe.json"


def _inputs(paths: list, where: str) -> list[dict]:
    """Each input file's path and size (its identity for the recipe)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise SelfReplayError(f"{where}: input file {missing[0]} not found")
    return [{"path": os.path.abspath(p), "bytes": Path(p).stat().st_size} for p in paths]


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _reuse(out: Path, recipe_file: Path, recipe: dict, legacy_ok: Callable[[], bool], log) -> bool:
    """Whether the existing ``out`` was built by ``recipe`` (False: build it afresh)."""
    if not out.exists():
        return False
    saved = _read(recipe_file)
    if saved == recipe:
        return True
    if saved is None:
        if legacy_ok():
            atomic_write_json(recipe_file, recipe)
            return True
        raise SelfReplayError(f"prepare: {out} exists but does not match this experiment's recipe (other inputs, size "
                              f"or tokenizer); delete it, or point the prepare block at another path")
    changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
    log(f"prepare: {out} was built with other settings ({', '.join(changed)}); rebuilding it")
    return False


def prepare_data(prepare: dict, log: Callable[[str], None] = print) -> None:
    """Train the tokenizer and tokenize the corpora named in the experiment's ``prepare`` block, when missing or
    built by another recipe."""
    from selfreplay.data.corpus import Corpus, tokenize_corpus
    from selfreplay.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tokenizer

    tok = prepare.get("tokenizer")
    fingerprint = None
    if tok:
        out = Path(tok["out"])
        recipe = {"inputs": _inputs(tok["inputs"], "prepare.tokenizer"), "vocab_size": tok.get("vocab_size", 4096),
                  "max_lines": tok.get("max_lines"), "shuffle_seed": tok.get("shuffle_seed", 0)}
        recipe_file = out.with_name(out.name + "." + RECIPE)
        legacy = lambda: load_tokenizer(out).get_vocab_size() == recipe["vocab_size"]  # noqa: E731
        if not _reuse(out, recipe_file, recipe, legacy, log):
            log(f"prepare: training tokenizer {out}")
            train_tokenizer(tok["inputs"], out, vocab_size=recipe["vocab_size"], max_lines_per_file=tok.get("max_lines"),
                            shuffle_seed=recipe["shuffle_seed"])
            atomic_write_json(recipe_file, recipe)
        fingerprint = tokenizer_fingerprint(load_tokenizer(out))
    for name, spec in (prepare.get("corpora") or {}).items():
        if not tok:
            raise SelfReplayError(f"prepare.corpora.{name}: needs prepare.tokenizer")
        out = Path(spec["out"])
        where = f"prepare.corpora.{name}"
        recipe = {"inputs": _inputs(spec["inputs"], where), "domain_token": spec["domain_token"],
                  "shuffle_seed": spec.get("shuffle_seed"), "max_tokens": spec.get("max_tokens"),
                  "name": spec.get("name", name), "tokenizer_fingerprint": fingerprint}

        def legacy() -> bool:
            meta = Corpus.open(out).meta
            same_inputs = [os.path.realpath(p) for p in meta.source] == [os.path.realpath(p) for p in spec["inputs"]]
            return (same_inputs and meta.domain_token == spec["domain_token"]
                    and meta.tokenizer_fingerprint == fingerprint
                    and (spec.get("max_tokens") is None or meta.num_tokens == spec["max_tokens"]))

        if not _reuse(out, out / RECIPE, recipe, legacy, log):
            log(f"prepare: tokenizing {name} -> {out}")
            tokenize_corpus(spec["inputs"], tok["out"], out, spec["domain_token"], max_tokens=spec.get("max_tokens"),
                            shuffle_seed=spec.get("shuffle_seed"), name=recipe["name"], show_progress=False)
            atomic_write_json(out / RECIPE, recipe)
