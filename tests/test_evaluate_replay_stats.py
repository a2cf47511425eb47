"""Quality numbers of a replay corpus (selfreplay.evaluate.replay_stats): distinct-n, domain coverage, overlap
with real data, padding after EOS left out, teacher NLL."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfreplay.data.corpus import Corpus, CorpusMeta, write_corpus
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.replay_stats import format_replay_stats, replay_stats
from selfreplay.models.builtin import wrap_gpt
from selfreplay.models.gpt import GPT, GPTConfig
from reference import next_token_loss
from selfreplay.replay.prompts import Prompts
from selfreplay.replay.sources import REPLAY_INFO
from selfreplay.replay.store import generate_replay

V, T = 64, 12


def _write_rows(path: Path, rows, eos=None, prompt_length=1) -> Path:
    write_corpus(np.array(rows), path, CorpusMeta(0, "uint16", V, "fp", 0, eos))
    if eos is not None or prompt_length != 1:
        (path / REPLAY_INFO).write_text(json.dumps({"eos_id": eos, "prompt_length": prompt_length}))
    return path


def test_replay_stats_on_a_hand_made_corpus(tmp_path):
    replay = _write_rows(tmp_path / "replay", [[0, 11, 12, 13, 11, 12],
                                               [1, 11, 12, 14, 15, 11],
                                               [0, 20, 20, 20, 20, 20],
                                               [0, 11, 12, 13, 11, 12]])
    write_corpus(np.array([11, 12, 13, 11, 30, 20, 20, 20, 31]), tmp_path / "real",
                 CorpusMeta(0, "uint16", V, "fp", 0, 10))
    s = replay_stats(replay, real=tmp_path / "real")
    assert (s["num_sequences"], s["sequence_length"], s["sampled_tokens"]) == (4, 6, 20)
    assert s["domains"] == {"0": 0.75, "1": 0.25}
    assert s["distinct_1"] == pytest.approx(6 / 20)
    assert s["distinct_2"] == pytest.approx(7 / 16)
    assert s["distinct_3"] == pytest.approx(7 / 12)
    assert s["distinct_4"] == pytest.approx(5 / 8)
    assert s["overlap_1"] == pytest.approx(18 / 20)
    assert s["overlap_2"] == pytest.approx(13 / 16)
    assert s["overlap_3"] == pytest.approx(7 / 12)
    assert s["overlap_4"] == pytest.approx(2 / 8)
    assert s["teacher_nll"] is None
    table = format_replay_stats(s)
    assert "0: 75.0%" in table and "0.6250" in table and "0.2500" in table
    json.dumps(s)  # plain JSON-able numbers for the CLI

    # the same rows as an array: no real corpus, no overlap columns
    arr = replay_stats(np.asarray(Corpus.open(replay).tokens).reshape(4, 6))
    assert arr["distinct_4"] == pytest.approx(5 / 8) and "overlap_4" not in arr
    assert "overlap" not in format_replay_stats(arr)
    assert replay_stats(torch.from_numpy(np.asarray(Corpus.open(replay).tokens).reshape(4, 6).astype(np.int64))
                        )["distinct_2"] == pytest.approx(7 / 16)
    # only the first rows
    first = replay_stats(replay, max_sequences=2)
    assert first["num_sequences"] == 2 and first["domains"] == {"0": 0.5, "1": 0.5}


def test_replay_stats_leave_out_padding_after_eos(tmp_path):
    replay = _write_rows(tmp_path / "eos", [[0, 11, 10, 0, 0, 0], [0, 11, 12, 13, 14, 15]], eos=10)
    s = replay_stats(replay)
    assert s["sampled_tokens"] == 7
    assert s["distinct_1"] == pytest.approx(6 / 7)
    assert s["distinct_2"] == pytest.approx(1.0)
    assert s["distinct_4"] == pytest.approx(1.0)  # only the full row has 4-grams: 2 of them


def test_replay_stats_of_a_multi_token_prompt_count_only_sampled_tokens(tmp_path):
    replay = _write_rows(tmp_path / "chat", [[0, 5, 11, 12], [0, 5, 11, 13]], prompt_length=2)
    s = replay_stats(replay)
    assert s["sampled_tokens"] == 4  # positions 2 and 3 of each row


def test_replay_stats_teacher_nll_is_the_mean_next_token_loss(tmp_path):
    torch.manual_seed(0)
    teacher = wrap_gpt(GPT(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=T, vocab_size=V))).eval()
    generate_replay(teacher, tmp_path / "replay", 6, Prompts.domains([0, 1], V), T, batch_size=8, seed=3,
                    show_progress=False)
    rows = torch.from_numpy(np.asarray(Corpus.open(tmp_path / "replay").tokens).reshape(6, T).astype(np.int64))
    s = replay_stats(tmp_path / "replay", teacher=teacher, batch_size=4)
    with torch.no_grad():
        expected = float(next_token_loss(teacher(rows), rows))
    assert s["teacher_nll"] == pytest.approx(expected, rel=1e-5)
    assert s["teacher_ppl"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert s["domains"] == {"0": 0.5, "1": 0.5}
    assert "teacher NLL/token" in format_replay_stats(s)


def test_replay_stats_errors_are_one_line(tmp_path):
    write_corpus(np.arange(11, 40), tmp_path / "flat", CorpusMeta(0, "uint16", V, "fp", 0, 10))
    for args, word in (((tmp_path / "flat",), "flat"), ((np.zeros((3, 1), dtype=np.int64),), "shape"),
                       ((np.zeros((3, 4), dtype=np.int64), None, None, 0), "max_sequences")):
        with pytest.raises(SelfReplayError, match=word) as e:
            replay_stats(*args)
        assert "\n" not in str(e.value)
