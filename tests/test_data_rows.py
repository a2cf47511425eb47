"""Training rows from tokenized records (selfreplay.data.rows): stream rows, one example per row, packed examples,
the split by example, and the RowLoader's epochs, resuming and checks."""

import json
import logging

import pytest
import torch

from conftest import one_line_error, write_chat_jsonl
from selfreplay.data.rows import RowLoader, example_rows, make_rows, resolve_packing, stream_rows
from selfreplay.data.text import TokenizedExample
from selfreplay.errors import SelfReplayError


def _example(ids, mask=None) -> TokenizedExample:
    ids = list(ids)
    return TokenizedExample(ids, list(mask) if mask is not None else [True] * len(ids))


# --- stream rows (plain text) ------------------------------------------------------------------------------------

def test_stream_rows_keep_every_token_and_its_mask():
    examples = [_example([1, 2, 3], [True, False, True]),
                _example(range(10, 22), [i % 3 == 0 for i in range(12)]),  # longer than a row
                _example([7, 8, 9], [False, True, True])]
    stream = [t for e in examples for t in e.input_ids]
    stream_mask = [m for e in examples for m in e.loss_mask]
    rows = stream_rows(examples, seq_len=5, pad_id=0)
    assert rows.input_ids.shape == (5, 5) and rows.input_ids.dtype == torch.long
    assert rows.position_ids is None
    # rows overlap by one token: row k starts with the last token of row k-1
    assert torch.equal(rows.input_ids[1:, 0], rows.input_ids[:-1, -1])
    rebuilt = [rows.input_ids[0, 0].item()] + rows.input_ids[:, 1:].reshape(-1).tolist()
    rebuilt_mask = [False] + rows.loss_mask[:, 1:].reshape(-1).tolist()
    n = len(stream)
    assert rebuilt[:n] == stream and rebuilt[n:] == [0] * (len(rebuilt) - n)  # tail padding
    assert rebuilt_mask[1:n] == stream_mask[1:] and not any(rebuilt_mask[n:])
    assert not rows.loss_mask[:, 0].any()
    assert rows.num_targets == sum(stream_mask[1:])
    assert rows.lengths.tolist() == [5, 5, 5, 5, 2]  # the last row holds 1 + 1 real tokens
    assert torch.equal(make_rows(examples, 5, 0, "stream").input_ids, rows.input_ids)


def test_rows_reject_bad_sizes():
    with pytest.raises(SelfReplayError) as e:
        make_rows([_example([1, 2])], seq_len=1, pad_id=0, packing="stream")
    one_line_error(e, "seq_len")
    with pytest.raises(SelfReplayError) as e:
        stream_rows([_example([1])], seq_len=4, pad_id=0)
    one_line_error(e, "1 tokens")
    with pytest.raises(SelfReplayError) as e:
        make_rows([_example([1, 2])], seq_len=4, pad_id=None, packing="none")
    one_line_error(e, "pad")


# --- one example per row (chats) ---------------------------------------------------------------------------------

def test_packing_defaults_by_format_and_stream_is_refused_for_chats():
    assert resolve_packing("auto", "text") == "stream"
    assert resolve_packing("auto", "messages") == resolve_packing("auto", "prompt_completion") == "none"
    assert resolve_packing("examples", "messages") == "examples"
    for fmt in ("messages", "prompt_completion"):
        with pytest.raises(SelfReplayError) as e:
            resolve_packing("stream", fmt, "data chat.jsonl")
        one_line_error(e, "chat.jsonl", "packing=stream", fmt)
    with pytest.raises(SelfReplayError) as e:
        resolve_packing("zip", "text")
    one_line_error(e, "data.packing='zip'")
    with pytest.raises(SelfReplayError) as e:
        RowLoader([_example([1, 2, 3])] * 4, "messages", 8, 0, 2, packing="stream")
    one_line_error(e, "packing=stream")


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """(tokenizer, examples, format) of 40 tiny synthetic chats."""
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    from selfreplay.data.text import tokenize_source

    tok = tiny_tokenizer()
    path = write_chat_jsonl(tmp_path_factory.mktemp("chats") / "chat.jsonl", n=40)
    examples, fmt = tokenize_source(path, tok)
    return tok, examples, fmt


def test_chats_are_one_example_per_row_by_default(chats):
    tok, examples, fmt = chats
    assert fmt == "messages" and max(len(e.input_ids) for e in examples) <= 64
    loader = RowLoader(examples, fmt, seq_len=64, pad_id=tok.pad_token_id, batch_size=4, seed=0, valid_examples=5)
    assert loader.packing == "none"
    assert len(loader.train) == 35 and len(loader.valid) == 5  # one row per example
    by_ids = {tuple(e.input_ids): e for e in examples}
    for rows in (loader.train, loader.valid):
        for i in range(len(rows)):
            k = int(rows.lengths[i])
            example = by_ids[tuple(rows.input_ids[i, :k].tolist())]  # exactly one whole example
            assert rows.loss_mask[i, :k].tolist() == [False] + example.loss_mask[1:]
            assert (rows.input_ids[i, k:] == tok.pad_token_id).all() and not rows.loss_mask[i, k:].any()
    batch = loader.next_batch()
    assert batch.tokens.shape[0] == 4 and batch.position_ids is None
    longest = max(len(e.input_ids) for e in by_ids.values()
                  if any(r[:len(e.input_ids)].tolist() == e.input_ids for r in batch.tokens))
    assert batch.tokens.shape[1] == longest < 64  # cut to the longest row of the batch
    # every target of every example is kept: the number of targets adds up
    assert loader.train.num_targets + loader.valid.num_targets == sum(sum(e.loss_mask[1:]) for e in examples)


def test_chat_rows_end_to_end(chats):
    """(was prepare_hf_data) a chat file's rows hold each conversation whole with its assistant-only targets."""
    tok, examples, fmt = chats
    rows = make_rows(examples[:3], 64, tok.pad_token_id, resolve_packing("auto", fmt))
    assert len(rows) == 3 and rows.num_targets == sum(sum(e.loss_mask) for e in examples[:3])
    assert rows.input_ids[0, :len(examples[0].input_ids)].tolist() == examples[0].input_ids
    targets = tok.decode(rows.input_ids[rows.loss_mask].tolist())
    assert "the answer is" in targets and "add" not in targets


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_examples_longer_than_a_row_are_dropped_or_truncated_with_a_count_in_the_log(too_long, caplog):
    lengths = [3, 10, 4, 12, 5]
    examples = [_example(range(100 * i + 1, 100 * i + 1 + n)) for i, n in enumerate(lengths)]
    with caplog.at_level(logging.WARNING, logger="selfreplay.data.rows"):
        rows = example_rows(examples, seq_len=6, pad_id=0, too_long=too_long, where="data f.jsonl")
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "f.jsonl" in message and "2 of 5 examples" in message and "data.seq_len=6" in message
    assert ("dropped" if too_long == "drop" else "truncated") in message
    if too_long == "drop":
        assert rows.lengths.tolist() == [3, 4, 5]
        assert [rows.input_ids[i, 0].item() for i in range(3)] == [1, 201, 401]
    else:
        assert rows.lengths.tolist() == [3, 6, 4, 6, 5]
        assert rows.input_ids[1].tolist() == list(range(101, 107))  # the first seq_len tokens
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfreplay.data.rows"):
        example_rows(examples[:1], seq_len=6, pad_id=0, too_long=too_long)
    assert not caplog.records  # nothing too long: nothing logged


def test_nothing_fits_or_bad_too_long_give_one_line_errors():
    with pytest.raises(SelfReplayError) as e:
        example_rows([_example(range(1, 11))], seq_len=6, pad_id=0, too_long="drop", where="data f.jsonl")
    one_line_error(e, "f.jsonl", "data.seq_len=6", "data.too_long")
    with pytest.raises(SelfReplayError) as e:
        example_rows([_example(range(1, 11))], seq_len=6, pad_id=0, too_long="cut")
    one_line_error(e, "data.too_long='cut'")


# --- packed whole examples ---------------------------------------------------------------------------------------

def test_packed_examples_restart_positions_and_never_split_an_example():
    lengths = [3, 4, 2, 5, 6, 1 + 1]
    examples = [_example(range(100 * i + 1, 100 * i + 1 + n)) for i, n in enumerate(lengths)]
    rows = make_rows(examples, seq_len=8, pad_id=0, packing="examples")
    assert rows.position_ids is not None
    # greedy: [3+4], [2+5], [6+2]
    assert rows.lengths.tolist() == [7, 7, 8]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert rows.position_ids[2].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    for i in range(len(rows)):
        k = int(rows.lengths[i])
        starts = (rows.position_ids[i, :k] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:] + [k]):
            ids = rows.input_ids[i, a:b].tolist()
            assert ids in [e.input_ids for e in examples]  # a whole example
            assert rows.loss_mask[i, a].item() is False and rows.loss_mask[i, a + 1:b].all()  # its first token: context
    assert rows.num_targets == sum(n - 1 for n in lengths)
    batch = rows.batch([0, 1])
    assert batch.position_ids.shape == batch.tokens.shape == (2, 7)


def test_packed_row_gives_each_example_the_logits_it_has_alone(chats):
    """Position ids restarting at 0 make the Hugging Face model attend within each example only."""
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_llama

    from selfreplay.models.core import CausalLM
    from selfreplay.models.hf import HF_ADAPTER

    tok, examples, fmt = chats
    model = CausalLM(tiny_llama(len(tok), seed=0), HF_ADAPTER).eval()
    loader = RowLoader(examples[:12], fmt, seq_len=128, pad_id=tok.pad_token_id, batch_size=3, seed=0,
                       valid_examples=0, packing="examples")
    assert len(loader.train) < 12  # several examples share a row
    batch = loader.train.batch(torch.arange(3))
    with torch.no_grad():
        packed = model(batch.tokens, position_ids=batch.position_ids)
        unpacked = model(batch.tokens)  # the same rows without position ids: attention crosses examples
    checked = crossed = 0
    for i in range(len(batch)):
        k = int(loader.train.lengths[i])
        starts = (batch.position_ids[i, :k] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:] + [k]):
            with torch.no_grad():
                alone = model(batch.tokens[i:i + 1, a:b])[0]
            torch.testing.assert_close(packed[i, a:b], alone, rtol=1e-4, atol=1e-4)
            checked += 1
            crossed += a > 0 and not torch.allclose(unpacked[i, a:b], alone, atol=1e-4)
    assert checked > len(batch) and crossed > 0


# --- the split by example and the loader -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, packing", [("text", "auto"), ("messages", "auto"), ("messages", "examples")])
def test_validation_split_is_by_example(fmt, packing):
    """No example has tokens in both the training and the validation rows (text streams included)."""
    lengths = [5 + (3 * i) % 7 for i in range(30)]
    examples = [_example(range(1000 * (i + 1), 1000 * (i + 1) + n)) for i, n in enumerate(lengths)]
    loader = RowLoader(examples, fmt, seq_len=16, pad_id=0, batch_size=2, seed=5, valid_examples=7,
                       packing=packing)

    def owners(rows):
        return {int(t) // 1000 - 1 for i in range(len(rows)) for t in rows.input_ids[i, :int(rows.lengths[i])]}

    train, valid = owners(loader.train), owners(loader.valid)
    assert len(valid) == 7 and not train & valid and train | valid == set(range(30))
    held_out = {int(t) // 1000 - 1 for b in loader.valid_batches(3) for t in b.tokens[b.tokens > 0]}
    assert held_out == valid  # valid_batches hand out exactly the held-out examples
    other = RowLoader(examples, fmt, seq_len=16, pad_id=0, batch_size=2, seed=6, valid_examples=7, packing=packing)
    assert owners(other.valid) != valid  # the seed picks the held-out examples
    # evaluate_all: only evaluated data, every example is held out
    whole = RowLoader(examples, fmt, seq_len=16, pad_id=0, batch_size=2, packing=packing, evaluate_all=True)
    assert owners(whole.valid) == set(range(30))


def _numbered(n=23, T=4) -> list[TokenizedExample]:
    return [_example([i + 1] * T) for i in range(n)]  # example i is all i+1 (0 is padding)


def _loader(n=23, **kw) -> RowLoader:
    kw = {"batch_size": 4, "seed": 3, "valid_examples": 3, **kw}
    return RowLoader(_numbered(n), "messages", seq_len=4, pad_id=0, **kw)


def _firsts(batch) -> list[int]:
    return (batch.tokens[:, 0] - 1).tolist()


def test_loader_holds_out_validation_and_reshuffles_each_epoch():
    loader = _loader()
    valid = [i for b in loader.valid_batches(2) for i in _firsts(b)]
    assert len(valid) == 3 and valid == sorted(valid)
    assert loader.num_train_rows == 20
    seen = [_firsts(loader.next_batch()) for _ in range(10)]  # 40 rows = 2 epochs of 20
    first, second = sum(seen[:5], []), sum(seen[5:], [])
    assert sorted(first) == sorted(second) == sorted(set(range(23)) - set(valid))
    assert first != second
    assert loader.epochs_done == pytest.approx(2.0)
    other_seed = _loader(seed=4)
    assert sum((_firsts(other_seed.next_batch()) for _ in range(5)), []) != first
    assert [i for b in loader.valid_batches(2, max_tokens=4) for i in _firsts(b)] == valid[:2]  # ~4 tokens: 1 batch


def test_loader_state_resumes_exactly():
    loader = _loader(seed=2, valid_examples=2)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch().tokens for _ in range(4)]
    resumed = _loader(seed=2, valid_examples=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch().tokens) for a in expected)
    assert resumed.epochs_done == loader.epochs_done
    with pytest.raises(SelfReplayError) as e:
        _loader(30, seed=2, valid_examples=2).load_state_dict(state)
    one_line_error(e, "loader state", "training sequences")
    with pytest.raises(SelfReplayError) as e:
        _loader(seed=9, valid_examples=2).load_state_dict(state)
    one_line_error(e, "loader state", "seed")


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_size=0), ["batch_size=0"]),
    (dict(batch_size=30), ["fewer than one batch of 30"]),
    (dict(valid_examples=23), ["valid_examples=23"]),
    (dict(valid_examples=-1), ["valid_examples=-1"]),
    (dict(packing="zip"), ["data.packing='zip'"]),
    (dict(too_long="cut"), ["data.too_long='cut'"]),
])
def test_loader_rejects_bad_settings(kwargs, words):
    with pytest.raises(SelfReplayError) as e:
        _loader(**kwargs)
    one_line_error(e, *words)
