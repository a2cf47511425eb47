"""Text records for Hugging Face models (selfreplay.data.text): loading local files, formats, tokenizing with the
loss mask, one-line errors."""

import json

import pytest

from conftest import one_line_error
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")

from hf_fixtures import tiny_tokenizer  # noqa: E402
from selfreplay.data.text import (TokenizedExample, detect_format, load_records, tokenize_chat,  # noqa: E402
                                  tokenize_records, tokenize_source)

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
    (tmp_path / "lines.json").write_text('{"text": "l1"}\n{"text": "l2"}\n')  # .json holding JSON lines
    assert load_records(str(tmp_path / "lines.json")) == [{"text": "l1"}, {"text": "l2"}]

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
    # a datasets.Dataset (or a list of records) is a source too, tokenized like the file
    tok = tiny_tokenizer()
    from_file, fmt = tokenize_source(path, tok)
    from_ds, fmt_ds = tokenize_source(ds, tok)
    assert fmt == fmt_ds == "text" and from_file == from_ds


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
    (lambda p: (p / "latin.txt").write_bytes(b"caf\xe9\n") and str(p / "latin.txt"), ["latin.txt", "UTF-8"]),
    (lambda p: (p / "x.csv").write_text("a,b\n") and str(p / "x.csv"), ["x.csv", ".csv"]),
])
def test_bad_files_give_one_line_errors(tmp_path, make, words):
    with pytest.raises(SelfReplayError) as e:
        load_records(make(tmp_path))
    one_line_error(e, *words)


def test_unknown_fields_and_bad_records_give_one_line_errors(tmp_path, tokenizer):
    from selfreplay.data.rows import RowLoader

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
    with pytest.raises(SelfReplayError) as e:
        tokenize_records([{"messages": CHAT}], tiny_tokenizer(chat_template=False), "messages",
                         source="data f.jsonl")
    one_line_error(e, "record 1", "chat template")
    # conversations without an assistant reply: nothing to train on (was prepare_hf_data)
    path = _write_jsonl(tmp_path / "no_reply.jsonl", [{"messages": CHAT[:2]}] * 3)
    examples, fmt = tokenize_source(path, tokenizer)
    with pytest.raises(SelfReplayError) as e:
        RowLoader(examples, fmt, seq_len=64, pad_id=tokenizer.pad_token_id, batch_size=1, where=f"data {path}")
    one_line_error(e, "no_reply.jsonl", "no target tokens")


# --- tokenizing --------------------------------------------------------------------------------------------------

def test_text_records_are_all_targets_and_end_with_eos(tokenizer):
    [example] = tokenize_records([{"text": "hello world"}], tokenizer, "text")
    assert example.input_ids == tokenizer("hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert all(example.loss_mask)
    [no_eos] = tokenize_records([{"text": "hello world"}], tokenizer, "text", add_eos=False)
    assert no_eos.input_ids == example.input_ids[:-1]


def test_chat_loss_mask_covers_exactly_the_assistant_replies(tokenizer):
    example = tokenize_chat(CHAT, tokenizer)
    assert example.input_ids == list(tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    assert _masked_pieces(tokenizer, example) == ["hello there<|im_end|>\n", "fine thank you<|im_end|>\n"]
    # the role headers, system and user turns are context only
    unmasked = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask) if not m])
    assert unmasked == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                        "<|im_start|>assistant\n<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\n")
    # the same through tokenize_records
    [via_records] = tokenize_records([{"messages": CHAT}], tokenizer, "messages")
    assert via_records == example


def test_chat_template_that_rewrites_history_is_rejected():
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

    # conversational prompt / completion (as in TRL): a chat whose completion messages are the targets
    conversational = {"prompt": [{"role": "user", "content": "how are you"}],
                      "completion": [{"role": "assistant", "content": "fine thank you"}]}
    [conv] = tokenize_records([conversational], tokenizer, "prompt_completion")
    assert conv == chat
