"""The YAML files users give (configs, experiments) are read with bounds: an alias bomb or a key given twice is a
one-line error naming the file, never a hang or a silently dropped value (selfreplay.yamlfile)."""

import time

import pytest

from conftest import one_line_error
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep import load_experiment
from selfreplay.yamlfile import read_yaml

EXPERIMENT = """name: tiny
stages:
  pretrain:
    kind: pretrain
    base: {data.train: x, stop.steps: 1}
"""


def test_ordinary_yaml_reads_as_before(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 1, seed: 2}\nrun:\n  <<: *b\n  seed: 3\nlist: [*b, *b]\n")
    assert read_yaml(path) == {"base": {"lr": 1, "seed": 2}, "run": {"lr": 1, "seed": 3},
                               "list": [{"lr": 1, "seed": 2}] * 2}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert read_yaml(empty) is None


def test_an_experiment_alias_bomb_is_refused_at_once(tmp_path):
    levels = ["  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]"
                                                            for i in range(1, 7)]
    path = tmp_path / "bomb.yaml"
    path.write_text(EXPERIMENT + "paper:\n" + "\n".join(levels) + "\n")
    start = time.monotonic()
    with pytest.raises(SelfReplayError) as e:
        load_experiment(str(path))
    assert time.monotonic() - start < 1
    one_line_error(e, f"experiment file {path}", "alias bomb")


def test_a_duplicate_experiment_key_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(EXPERIMENT + "  pretrain:\n    kind: finetune\n")
    with pytest.raises(SelfReplayError) as e:
        load_experiment(str(path))
    assert str(e.value) == f"experiment file {path}: duplicate key 'stages.pretrain' (line 6); give each key once"
