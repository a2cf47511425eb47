"""Text readers and the byte-level BPE tokenizer with reserved domain tokens."""

import gzip
import json
import lzma
from pathlib import Path

import pytest

from conftest import one_line_error
from selfreplay.errors import SelfReplayError
from selfreplay.data.tokenizer import (EOS_ID, EOS_TOKEN, N_RESERVED, domain_token_name, eos_id, iter_text,
                                  load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_tokenizer)

EN_XZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "en.txt.xz"  # ../shared beside the checkout

LINES = [f"line {i}: the quick brown fox {'jumps' if i % 2 else 'sleeps'} over {i * 7 % 13} lazy dogs, año ñandú"
         for i in range(40)]




@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("\n".join(LINES * 3) + "\n", encoding="utf-8")
    train_tokenizer([d / "a.txt"], d / "tok.json", vocab_size=320)
    return d / "tok.json"


# ------------------------------------------------------------------------------------------------------- readers

def test_txt_skips_empty_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first\n\n   \nsecond\r\nthird", encoding="utf-8")
    assert list(iter_text(p)) == ["first", "second", "third"]


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".xz", lzma.open)])
def test_compressed_txt_and_jsonl(tmp_path, suffix, opener):
    with opener(tmp_path / f"a.txt{suffix}", "wt", encoding="utf-8") as f:
        f.write("\n".join(LINES) + "\n")
    assert list(iter_text(tmp_path / f"a.txt{suffix}")) == LINES
    with opener(tmp_path / f"b.jsonl{suffix}", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(LINES))
    assert list(iter_text(tmp_path / f"b.jsonl{suffix}", text_field="body")) == LINES


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": LINES + [None, ""], "n": list(range(len(LINES) + 2))}), tmp_path / "a.parquet")
    assert list(iter_text(tmp_path / "a.parquet")) == LINES
    (tmp_path / "a.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    assert list(iter_text(tmp_path / "a.parquet.gz", max_lines=3)) == LINES[:3]
    with pytest.raises(SelfReplayError) as e:
        list(iter_text(tmp_path / "a.parquet", text_field="body"))
    one_line_error(e, "a.parquet", "body", "columns: text, n")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SelfReplayError) as e:
        list(iter_text(tmp_path / "bad.parquet"))
    one_line_error(e, "bad.parquet", "parquet")


def test_max_lines_and_shuffle(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\n".join(LINES), encoding="utf-8")
    assert list(iter_text(p, max_lines=5)) == LINES[:5]
    s0 = list(iter_text(p, shuffle_seed=0))
    assert s0 == list(iter_text(p, shuffle_seed=0)) and s0 != LINES and sorted(s0) == sorted(LINES)
    assert s0 != list(iter_text(p, shuffle_seed=1))
    assert list(iter_text(p, shuffle_seed=0, max_lines=7)) == s0[:7]  # shuffle first, then take


def test_real_xz_file():
    if not EN_XZ.exists():
        pytest.skip("shared corpus not present")
    lines = list(iter_text(EN_XZ, max_lines=2000))
    assert len(lines) == 2000 and all(line.strip() for line in lines)


@pytest.mark.parametrize("name,content,words", [
    ("missing.txt", None, ["missing.txt", "not found"]),
    ("a.csv", b"x,y\n", ["a.csv", "unknown file type"]),
    ("a.txt.gz", b"this is not gzip data", ["a.txt.gz", "gzip"]),
    ("a.txt.xz", b"this is not xz data", ["a.txt.xz", "xz"]),
    ("t.txt.xz", lzma.compress(b"one\ntwo\n" * 100)[:30], ["t.txt.xz", "xz"]),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', ["a.jsonl", "invalid JSON on line 3"]),
    ("b.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', ["b.jsonl", "line 2", "'text'"]),
    ("c.jsonl", b'{"text": 5}\n', ["c.jsonl", "line 1"]),
    ("empty.txt", b"\n\n  \n", ["empty.txt", "empty"]),
    ("empty.txt.gz", gzip.compress(b"", mtime=0), ["empty.txt.gz", "empty"]),
    ("bin.txt", b"\xff\xfe\x00bad", ["bin.txt", "UTF-8"]),
])
def test_bad_input_is_one_line_error(tmp_path, name, content, words):
    p = tmp_path / name
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(SelfReplayError) as e:
        list(iter_text(p))
    one_line_error(e, *words)


# ----------------------------------------------------------------------------------------------------- tokenizer

def test_reserved_ids_and_eos(tok_path):
    tok = load_tokenizer(tok_path)
    assert [tok.token_to_id(domain_token_name(i)) for i in range(N_RESERVED)] == list(range(10))
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID == eos_id(tok) == 10
    assert tok.get_vocab_size() == 320
    with pytest.raises(SelfReplayError):
        domain_token_name(10)


def test_byte_level_round_trip(tok_path):
    tok = load_tokenizer(tok_path)
    text = "Unseen text — with ñ, 漢字 and emoji 🙂\ttabs  double  spaces"
    ids = tok.encode(text).ids
    assert all(i > EOS_ID for i in ids)  # plain text never produces reserved ids
    assert tok.decode(ids) == text
    assert tok.encode(domain_token_name(3)).ids == [3]


def test_fingerprint_and_atomic_save(tok_path, tmp_path):
    tok = load_tokenizer(tok_path)
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 16 and fp == tokenizer_fingerprint(load_tokenizer(tok_path))
    save_tokenizer(tok, tmp_path / "sub" / "copy.json")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "sub" / "copy.json")) == fp
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["copy.json"]  # no temp file left behind
    other = train_tokenizer([tok_path.parent / "a.txt"], tmp_path / "other.json", vocab_size=300)
    assert tokenizer_fingerprint(other) != fp


def test_training_is_deterministic(tok_path, tmp_path):
    again = train_tokenizer([tok_path.parent / "a.txt"], tmp_path / "again.json", vocab_size=320)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(load_tokenizer(tok_path))


def test_train_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(SelfReplayError) as e:
        train_tokenizer([tmp_path / "a.txt"], tmp_path / "t.json", vocab_size=267)
    one_line_error(e, "vocab_size=267")
    with pytest.raises(SelfReplayError) as e:
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "t.json", vocab_size=300)
    one_line_error(e, "nope.txt", "not found")
    assert not (tmp_path / "t.json").exists()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        load_tokenizer(tmp_path / "none.json")
    one_line_error(e, "none.json", "not found")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(SelfReplayError) as e:
        load_tokenizer(tmp_path / "bad.json")
    one_line_error(e, "bad.json", "not a valid tokenizer")
    from tokenizers import Tokenizer, models
    foreign = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    save_tokenizer(foreign, tmp_path / "foreign.json")
    with pytest.raises(SelfReplayError) as e:
        load_tokenizer(tmp_path / "foreign.json")
    one_line_error(e, "foreign.json", "not a selfreplay tokenizer")
