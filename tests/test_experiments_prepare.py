"""An experiment's ``prepare`` block: built once, rebuilt when its recipe changes, never silently reused."""

import json
import logging
import os

import pytest

from selfreplay.data.corpus import Corpus
from selfreplay.data.loader import CorpusLoader
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.prepare import RECIPE, prepare_data


def _texts(tmp_path):
    en, es = tmp_path / "en.txt", tmp_path / "es.txt"
    en.write_text("\n".join(f"the cat number {i} sat on the mat and looked around" for i in range(400)))
    es.write_text("\n".join(f"el gato numero {i} se sento en la alfombra y miro" for i in range(400)))
    return en, es


def _block(tmp_path, en, es, max_tokens):
    return {"tokenizer": {"inputs": [str(en), str(es)], "out": str(tmp_path / "work" / "tok.json"),
                          "vocab_size": 300},
            "corpora": {"en": {"inputs": [str(en)], "out": str(tmp_path / "work" / "en"), "domain_token": 0,
                               "max_tokens": max_tokens},
                        "es": {"inputs": [str(es)], "out": str(tmp_path / "work" / "es"), "domain_token": 1,
                               "max_tokens": max_tokens}}}


def test_outputs_are_reused_only_when_built_by_the_same_recipe(tmp_path):
    en, es = _texts(tmp_path)
    messages = []
    prepare_data(_block(tmp_path, en, es, 2000), messages.append)
    assert sum("tokenizing" in m for m in messages) == 2
    en_out = tmp_path / "work" / "en"
    recipe = json.loads((en_out / RECIPE).read_text())
    assert recipe["max_tokens"] == 2000 and recipe["tokenizer_fingerprint"]
    assert Corpus.open(en_out).meta.num_tokens == 2000

    messages.clear()
    prepare_data(_block(tmp_path, en, es, 2000), messages.append)
    assert messages == []  # same recipe: nothing rebuilt

    # a quick start left smaller corpora: a larger experiment rebuilds them and says why
    prepare_data(_block(tmp_path, en, es, 3000), messages.append)
    assert any("built with other settings (max_tokens)" in m for m in messages)
    assert Corpus.open(en_out).meta.num_tokens == 3000

    # an input file that changed size is another recipe too
    en.write_text(en.read_text() + "\nmore text")
    messages.clear()
    prepare_data(_block(tmp_path, en, es, 3000), messages.append)
    assert any("rebuilding" in m and "inputs" in m for m in messages)


def test_an_output_without_a_recipe_is_kept_only_when_its_metadata_matches(tmp_path):
    en, es = _texts(tmp_path)
    prepare_data(_block(tmp_path, en, es, 2000), lambda m: None)
    for name in ("en", "es"):
        (tmp_path / "work" / name / RECIPE).unlink()  # as an earlier version left them
    prepare_data(_block(tmp_path, en, es, 2000), lambda m: None)  # matching metadata: adopted
    assert (tmp_path / "work" / "en" / RECIPE).is_file()
    (tmp_path / "work" / "en" / RECIPE).unlink()
    # the quick start's `selfreplay tokenize` records the input's absolute path; a sweep may name it relatively
    relative = _block(tmp_path, en, es, 2000)
    relative["corpora"]["en"]["inputs"] = [os.path.relpath(en)]
    prepare_data(relative, lambda m: None)
    assert (tmp_path / "work" / "en" / RECIPE).is_file()
    (tmp_path / "work" / "en" / RECIPE).unlink()
    with pytest.raises(SelfReplayError, match="does not match this experiment's recipe"):
        prepare_data(_block(tmp_path, en, es, 3000), lambda m: None)


def test_a_validation_split_larger_than_the_training_split_warns(corpora, caplog):
    corpus = Corpus.open(corpora["en"])
    with caplog.at_level(logging.WARNING):
        CorpusLoader(corpus, context=16, batch_size=4, valid_tokens=corpus.meta.num_tokens // 2 + 1000)
    assert "larger than the training split" in caplog.text
