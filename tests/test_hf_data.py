import json

import pytest
import torch

from conftest import one_line_error
from hf_fixtures import tiny_tokenizer
from selfreplay.errors import SelfReplayError
from selfreplay.hf_data import (HFBatchLoader, PackedRows, TokenizedExample, detect_format, load_records,
                                pack_examples, prepare_hf_data, tokenize_chat, tokenize_records)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thank you"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _masked_pieces(tokenizer, example: TokenizedExample) -> list[str]:
    """The decoded target tokens, grouped into maximal runs."""
    runs, current = [], []
    for token, on in zip(example.input_ids, example.loss_mask):
        if on:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- loading -----------------------------------------------------------------------------------------------------

def test_load_each_local_format(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    assert load_records(str(tmp_path / "a.txt")) == [{"text": "first doc"}, {"text": "second doc"}]
    assert load_records(str(tmp_path / "a.txt"), text_field="body")[0] == {"body": "first doc"}

    jsonl = _write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, {"text": "y"}])
    assert load_records(jsonl) == [{"text": "x"}, {"text": "y"}]
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    assert load_records(str(tmp_path / "c.json")) == [{"prompt": "p", "completion": "c"}]

    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}, {"messages": CHAT[:3]}]), tmp_path / "d.parquet")
    records = load_records(str(tmp_path / "d.parquet"))
    assert records[0]["messages"] == CHAT and detect_format(records) == "messages"


def test_directory_reads_the_named_split_when_present(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "t1"}, {"text": "t2"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "v1"}])
    assert [r["text"] for r in load_records(str(tmp_path))] == ["t1", "t2"]
    assert [r["text"] for r in load_records(str(tmp_path), split="test")] == ["v1"]
    assert len(load_records(str(tmp_path), split="other")) == 3  # no file of that split: all files


def test_datasets_reads_the_same_records_from_a_local_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = _write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}, {"text": "y"}])
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "cache"))
    assert [dict(r) for r in ds] == load_records(path)


def test_detect_format():
    assert detect_format([{"text": "a"}]) == "text"
    assert detect_format([{"body": "a"}], text_field="body") == "text"
    assert detect_format([{"prompt": "a", "completion": "b", "text": "c"}]) == "prompt_completion"
    assert detect_format([{"messages": CHAT}]) == "messages"


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "missing.jsonl"), ["missing.jsonl", "no such file"]),
    (lambda p: (p / "e.jsonl").write_text("\n") and str(p / "e.jsonl"), ["e.jsonl", "empty"]),
    (lambda p: (p / "bad.jsonl").write_text('{"text": 1}\n{oops\n') and str(p / "bad.jsonl"),
     ["bad.jsonl", "line 2", "invalid JSON"]),
    (lambda p: (p / "arr.jsonl").write_text('[1, 2]\n') and str(p / "arr.jsonl"), ["arr.jsonl", "JSON object"]),
    (lambda p: (p / "x.parquet").write_text("not parquet") and str(p / "x.parquet"), ["x.parquet", "parquet"]),
])
def test_bad_files_give_one_line_errors(tmp_path, make, words):
    with pytest.raises(SelfReplayError) as e:
        load_records(make(tmp_path))
    one_line_error(e, *words)


def test_unknown_fields_and_bad_records_give_one_line_errors(tmp_path, tokenizer):
    with pytest.raises(SelfReplayError) as e:
        detect_format([{"question": "q"}], source="data f.jsonl")
    one_line_error(e, "f.jsonl", "record 1", "question", "messages")
    with pytest.raises(SelfReplayError) as e:
        detect_format([{"text": "a"}, {"txt": "b"}], source="data f.jsonl")
    one_line_error(e, "f.jsonl", "record 2", "'text'")
    with pytest.raises(SelfReplayError) as e:
        tokenize_records([{"messages": [{"role": "user"}]}], tokenizer, "messages", source="data f.jsonl")
    one_line_error(e, "f.jsonl", "record 1", "content")
    with pytest.raises(SelfReplayError) as e:
        tokenize_records([{"text": 3}], tokenizer, "text", source="data f.jsonl")
    one_line_error(e, "record 1", "'text'", "string")
    path = _write_jsonl(tmp_path / "no_reply.jsonl", [{"messages": CHAT[:2]}])
    with pytest.raises(SelfReplayError) as e:
        prepare_hf_data(path, tokenizer, seq_len=8)
    one_line_error(e, "no_reply.jsonl", "no target tokens")


# --- tokenizing --------------------------------------------------------------------------------------------------

def test_text_records_are_all_targets_and_end_with_eos(tokenizer):
    [example] = tokenize_records([{"text": "hello world"}], tokenizer, "text")
    assert example.input_ids == tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert all(example.loss_mask)


def test_chat_loss_mask_covers_exactly_the_assistant_replies(tokenizer):
    example = tokenize_chat(CHAT, tokenizer)
    assert example.input_ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    assert _masked_pieces(tokenizer, example) == ["hello there<|im_end|>\n", "fine thank you<|im_end|>\n"]
    # the role headers, system and user turns are context only
    unmasked = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])
    assert unmasked == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_that_rewrites_history_is_rejected(tokenizer):
    tok = tiny_tokenizer()
    # numbers turns from the end: adding a message changes all the text before it
    tok.chat_template = ("{% for m in messages %}{{ messages|length - loop.index }}:{{ m['content'] }}|{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(SelfReplayError) as e:
        tokenize_chat(CHAT, tok, "data f.jsonl: record 1")
    one_line_error(e, "record 1", "incrementally")


def test_prompt_completion_with_and_without_chat_template(tokenizer):
    record = {"prompt": "how are you", "completion": "fine thank you"}
    [chat] = tokenize_records([record], tokenizer, "prompt_completion")
    assert _masked_pieces(tokenizer, chat) == ["fine thank you<|im_end|>\n"]
    assert tokenizer.decode(chat.input_ids).startswith("<|im_start|>user\nhow are you<|im_end|>")

    plain = tiny_tokenizer(chat_template=False)
    [example] = tokenize_records([record], plain, "prompt_completion")
    assert plain.decode(example.input_ids) == "how are youfine thank you</s>"
    assert _masked_pieces(plain, example) == ["fine thank you</s>"]
    assert example.loss_mask[0] is False


# --- packing -----------------------------------------------------------------------------------------------------

def test_packing_keeps_every_token_and_its_mask():
    examples = [TokenizedExample([1, 2, 3], [True, False, True]),
                TokenizedExample(list(range(10, 22)), [i % 3 == 0 for i in range(12)]),  # longer than a row
                TokenizedExample([7, 8, 9], [False, True, True])]
    stream = [t for e in examples for t in e.input_ids]
    stream_mask = [m for e in examples for m in e.loss_mask]
    rows = pack_examples(examples, seq_len=5, pad_id=0)
    assert rows.input_ids.shape == (5, 5) and rows.input_ids.dtype == torch.long
    # rows overlap by one token: row k starts with the last token of row k-1
    assert torch.equal(rows.input_ids[1:, 0], rows.input_ids[:-1, -1])
    rebuilt = [rows.input_ids[0, 0].item()] + rows.input_ids[:, 1:].reshape(-1).tolist()
    rebuilt_mask = [False] + rows.loss_mask[:, 1:].reshape(-1).tolist()
    n = len(stream)
    assert rebuilt[:n] == stream and rebuilt[n:] == [0] * (len(rebuilt) - n)  # tail padding
    assert rebuilt_mask[1:n] == stream_mask[1:] and not any(rebuilt_mask[n:])
    assert not rows.loss_mask[:, 0].any()
    assert rows.num_targets == sum(stream_mask[1:])


def test_pack_rejects_bad_sizes():
    with pytest.raises(SelfReplayError) as e:
        pack_examples([TokenizedExample([1, 2], [True, True])], seq_len=1, pad_id=0)
    one_line_error(e, "seq_len")


def test_prepare_hf_data_end_to_end(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    rows = prepare_hf_data(path, tokenizer, seq_len=16)
    example = tokenize_chat(CHAT, tokenizer)
    assert rows.num_targets == 3 * sum(example.loss_mask)
    assert rows.input_ids[0, :16].tolist() == example.input_ids[:16]


# --- batches -----------------------------------------------------------------------------------------------------

def _numbered_rows(n=23, T=4) -> PackedRows:
    ids = torch.arange(n)[:, None].repeat(1, T)  # row i is all i
    return PackedRows(ids, torch.ones(n, T, dtype=torch.bool))


def test_loader_holds_out_validation_and_reshuffles_each_epoch():
    loader = HFBatchLoader(_numbered_rows(), batch_size=4, seed=3, valid_rows=3)
    valid = torch.cat([ids[:, 0] for ids, _ in loader.valid_batches(2)]).tolist()
    assert len(valid) == 3 and valid == sorted(valid)
    seen = [loader.next_batch()[0][:, 0] for _ in range(10)]  # 40 rows = 2 epochs of 20
    first, second = torch.cat(seen[:5]).tolist(), torch.cat(seen[5:]).tolist()
    assert sorted(first) == sorted(second) == sorted(set(range(23)) - set(valid))
    assert first != second
    assert loader.epochs_done() == pytest.approx(2.0)
    other_seed = HFBatchLoader(_numbered_rows(), batch_size=4, seed=4, valid_rows=3)
    assert torch.cat([other_seed.next_batch()[0][:, 0] for _ in range(5)]).tolist() != first


def test_ranks_together_see_the_single_process_batches():
    single = HFBatchLoader(_numbered_rows(), batch_size=6, seed=1, valid_rows=5)
    ranks = [HFBatchLoader(_numbered_rows(), batch_size=6, seed=1, valid_rows=5, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(7):  # crosses epoch boundaries
        ids, mask = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(p[0].shape == (3, 4) for p in parts)
        assert sorted(torch.cat([p[0][:, 0] for p in parts]).tolist()) == sorted(ids[:, 0].tolist())
        assert torch.equal(parts[0][0], ids[0::2]) and torch.equal(parts[1][0], ids[1::2])
    single_valid = torch.cat([v[0] for v in single.valid_batches(4)])
    rank_valid = [[v[0] for v in loader.valid_batches(4)] for loader in ranks]
    assert len(rank_valid[0]) == len(rank_valid[1])
    assert sorted(torch.cat(rank_valid[0] + rank_valid[1])[:, 0].tolist()) == sorted(single_valid[:, 0].tolist())


def test_loader_state_resumes_exactly():
    loader = HFBatchLoader(_numbered_rows(), batch_size=4, seed=2, valid_rows=2)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch()[0] for _ in range(4)]
    resumed = HFBatchLoader(_numbered_rows(), batch_size=4, seed=2, valid_rows=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in expected)
    with pytest.raises(SelfReplayError) as e:
        HFBatchLoader(_numbered_rows(30), batch_size=4, seed=2, valid_rows=2).load_state_dict(state)
    one_line_error(e, "loader state", "training rows")


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_size=5, world_size=2), ["batch_size=5", "world_size=2"]),
    (dict(batch_size=30), ["fewer than one batch of 30"]),
    (dict(batch_size=4, valid_rows=23), ["valid_rows=23"]),
    (dict(batch_size=4, rank=2, world_size=2), ["rank=2"]),
])
def test_loader_rejects_bad_settings(kwargs, words):
    with pytest.raises(SelfReplayError) as e:
        HFBatchLoader(_numbered_rows(), **kwargs)
    one_line_error(e, *words)
