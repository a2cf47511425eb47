"""Building a run's parts: the old corpus is always split as the teacher's run split it."""

import json

import numpy as np
import pytest

from conftest import make_corpus, one_line_error
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, load_config
from selfreplay.data.corpus import Corpus
from selfreplay.data.loader import CorpusLoader
from selfreplay.errors import SelfReplayError
from selfreplay.train import prepare, train
from selfreplay.train.build import build_parts

TINY = {"model.d_model": 32, "model.n_layers": 1, "model.head_dim": 16, "model.context": 16,
        "model.vocab_size": 64, "data.batch_size": 8, "optim.warmup_tokens": 0, "log.progress": False,
        "replay.batch_size": 4, "eval.every_tokens": 10 ** 6}


def _cfg(**values) -> TrainConfig:
    return load_config(TrainConfig, [], [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher pretrained on "en" with its own split: 900 validation tokens, split seed 7."""
    root = tmp_path_factory.mktemp("build")
    en, es = make_corpus(root / "en", seed=1, domain=0), make_corpus(root / "es", seed=2, domain=1)
    train(_cfg(run_dir=root / "pre", **{"data.train": en, "data.valid_tokens": 900, "data.seed": 7,
                                        "stop.steps": 3, **TINY}), PRETRAIN)
    return root, en, es


def _parts(root, es, **extra):
    cfg = _cfg(run_dir=root / "ft", **{"data.train": es, "model.model_name_or_path": root / "pre",
                                       "data.valid_tokens": 300, "data.seed": 3, "stop.steps": 1, **extra})
    cfg, kind, info = prepare(cfg, FINETUNE)
    return build_parts(cfg, kind, FINETUNE, info.device)


def _teacher_loader(en) -> CorpusLoader:
    return CorpusLoader(Corpus.open(en), 16, 4, valid_tokens=900, seed=7)


@pytest.mark.parametrize("explicit", [False, True], ids=["recorded", "eval.prev"])
def test_old_corpus_keeps_the_teachers_split(teacher_run, explicit):
    """Forgetting is measured on exactly the teacher's held-out rows, and real replay draws only from the rows the
    teacher trained on — also when eval.prev names the corpus and the finetune has another split / seed."""
    root, en, es = teacher_run
    parts = _parts(root, es, **({"eval.prev": en} if explicit else {}), **{"replay.method": "kl",
                                                                         "replay.source": "prev"})
    teacher = _teacher_loader(en)
    assert np.array_equal(parts.prev.valid_indices, teacher.valid_indices)
    replayed = {tuple(row) for _ in range(40) for row in parts.penalty.next_replay().tokens.tolist()}
    held_out = {tuple(row) for b in teacher.valid_batches(64) for row in b.tokens.tolist()}
    assert replayed and not replayed & held_out
    assert json.loads(json.dumps(parts.info["prev_corpus"]))["split_seed"] == 7


def test_a_corpus_the_teacher_never_saw_uses_the_finetunes_split(teacher_run):
    root, en, es = teacher_run
    parts = _parts(root, es, **{"replay.method": "none"})
    assert parts.info["train_corpus"]["split_seed"] == 3 and parts.info["train_corpus"]["valid_tokens"] == 300


def test_an_unknown_teacher_split_is_refused(teacher_run, tmp_path):
    """A checkpoint whose run.json records no training corpus: its held-out rows cannot be known."""
    import shutil

    root, en, es = teacher_run
    shutil.copytree(root / "pre", tmp_path / "pre")
    info = json.loads((tmp_path / "pre" / "run.json").read_text())
    info.pop("train_corpus")
    (tmp_path / "pre" / "run.json").write_text(json.dumps(info))
    cfg = _cfg(run_dir=tmp_path / "ft", **{"data.train": es, "model.model_name_or_path": tmp_path / "pre",
                                           "eval.prev": en, "stop.steps": 1, "replay.method": "none",
                                           "data.batch_size": 8, "data.valid_tokens": 300})
    cfg, kind, info = prepare(cfg, FINETUNE)
    with pytest.raises(SelfReplayError) as e:
        build_parts(cfg, kind, FINETUNE, info.device)
    one_line_error(e, "eval.prev", "split is unknown")


def test_a_mixture_pretraining_measures_its_mix_corpus_on_its_own_held_out_rows(teacher_run, tmp_path):
    """Pretraining on English with Spanish rows mixed in, eval.prev=Spanish: the Spanish loss is read on exactly
    the Spanish rows the mixture held out (the capacity frontier's Spanish axis), never on rows it trains on."""
    root, en, es = teacher_run
    cfg = _cfg(run_dir=tmp_path / "mix", **{"data.train": en, "data.mix": es, "data.mix_fraction": 0.25,
                                            "eval.prev": es, "data.valid_tokens": 500, "data.seed": 5,
                                            "stop.steps": 2, **TINY})
    cfg, kind, info = prepare(cfg, PRETRAIN)
    parts = build_parts(cfg, kind, PRETRAIN, info.device)
    mix_held_out = CorpusLoader(Corpus.open(es), 16, 4, valid_tokens=500, seed=5).valid_indices
    assert np.array_equal(parts.prev.valid_indices, mix_held_out)


def test_a_moved_corpus_is_recognised_by_its_identity(teacher_run, tmp_path):
    """The split follows the corpus, not its path: a copied corpus keeps the teacher's held-out rows."""
    import shutil

    root, en, es = teacher_run
    shutil.copytree(en, tmp_path / "en_copy")
    parts = _parts(root, es, **{"eval.prev": tmp_path / "en_copy", "replay.method": "none"})
    assert np.array_equal(parts.prev.valid_indices, _teacher_loader(en).valid_indices)


@pytest.mark.parametrize("rows", [True, False], ids=["replay-corpus", "token-corpus"])
def test_replay_in_another_tokenizer_of_the_same_vocabulary_is_refused(teacher_run, tmp_path, rows):
    """replay.source=<corpus> is checked against the model's tokenizer as data.train is (the vocabulary size alone
    does not tell two tokenizers apart)."""
    from conftest import markov_tokens
    from selfreplay.data.corpus import CorpusMeta, write_corpus

    root, en, es = teacher_run
    for name, fingerprint in (("same", "synthetic-v1"), ("other", "other-tokenizer")):
        if rows:
            meta = CorpusMeta(num_tokens=0, dtype="uint16", vocab_size=64, tokenizer_fingerprint=fingerprint,
                              domain_token=None, eos_token=10, name=name)
            write_corpus(markov_tokens(3, 32 * 16).reshape(32, 16), tmp_path / name, meta)
        else:
            make_corpus(tmp_path / name, seed=3, domain=0, n=2000, fingerprint=fingerprint)
    parts = _parts(root, es, **{"replay.source": tmp_path / "same", "replay.batch_size": 4})
    assert parts.penalty.next_replay().tokens.shape == (4, 16)
    with pytest.raises(SelfReplayError) as e:
        _parts(root, es, **{"replay.source": tmp_path / "other", "replay.batch_size": 4})
    one_line_error(e, "replay.source", f"corpus {tmp_path / 'other'}", "other-tokenizer", "synthetic-v1")
