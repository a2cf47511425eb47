"""Text records for Hugging Face models: load them, recognise their format, tokenize them with the model's tokenizer.

Three record formats are recognised (:func:`detect_format`):
- ``text``: ``{"text": "..."}``; tokenized, an EOS appended, every token a target;
- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``; rendered with the tokenizer's chat template,
  only assistant tokens (each reply's content and its end-of-turn tokens, not the role header) are targets;
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; rendered as a user/assistant exchange when the
  tokenizer has a chat template, else prompt + completion + EOS; only the completion is a target.

:mod:`selfreplay.data.rows` turns the tokenized examples into training rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from selfreplay.errors import SelfReplayError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FORMATS = ("text", "messages", "prompt_completion")
HF_EXTRAS = "pip install 'selfreplay[hf]'"

# --- loading records ---------------------------------------------------------------------------------------------

def load_records(source: str, split: str = "train", text_field: str = "text") -> list[dict]:
    """The records of a local file, a directory of files, or a ``datasets`` hub name (``"name"`` / ``"name:config"``).

    Local files: ``.jsonl`` (one JSON object a line), ``.json`` (JSON lines or one array of objects), ``.parquet``,
    ``.txt`` (one document a line, empty lines skipped, as ``{text_field: line}``). A directory contributes its
    files with those suffixes in name order; if some of them are named after ``split`` (``train.jsonl``,
    ``train-00000.parquet``, or a sub-directory ``train/``) only those are read. A single file is its own split.
    Anything else that is not an existing path is looked up with ``datasets.load_dataset(name, config, split=split)``
    (``split`` may use the slicing syntax, e.g. ``train[:1000]``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        records = [r for f in _split_files(path, split) for r in _read_file(f, text_field)]
    elif path.exists():
        records = _read_file(path, text_field)
    elif looks_local(source):
        raise SelfReplayError(f"data {source}: no such file or directory")
    else:
        records = _load_hub(source, split)
    if not records:
        raise SelfReplayError(f"data {source}: no records (empty)")
    return records


def looks_local(name: str) -> bool:
    """Whether a name can only mean a local path, never a hub id (``name`` or ``owner/name``): it starts with
    '.', '/' or '~', ends like a data file, holds a backslash or more than one '/', or its first part is an
    existing local directory (``runs/x`` where ``runs/`` exists). Such a name that does not exist is refused at
    once instead of being looked up on the hub."""
    name = str(name)
    first = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES + (".gz", ".xz", ".csv"))
            or "\\" in name or name.count("/") > 1 or ("/" in name and Path(first).is_dir()))


def _split_files(directory: Path, split: str) -> list[Path]:
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
    if not files:
        raise SelfReplayError(f"data {directory}: directory holds no {'/'.join(LOCAL_SUFFIXES)} files")
    split_name = split.split("[")[0]
    of_split = [f for f in files if f.stem == split_name or f.stem.startswith(split_name + "-")
                or split_name in f.relative_to(directory).parts[:-1]]
    return of_split or files


def _read_file(path: Path, text_field: str) -> list[dict]:
    try:
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [{text_field: line} for line in lines if line.strip()]
        if path.suffix == ".parquet":
            return _read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            return _read_json(path)
    except UnicodeDecodeError as e:
        raise SelfReplayError(f"data {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    raise SelfReplayError(f"data {path}: unsupported file type {path.suffix!r}; expected one of "
                          f"{', '.join(LOCAL_SUFFIXES)}")


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SelfReplayError(f"data {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        numbered = list(enumerate(records, 1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise SelfReplayError(f"data {path}: line {lineno}: invalid JSON ({e.msg})") from None
    for where, record in numbered:
        if not isinstance(record, dict):
            raise SelfReplayError(f"data {path}: record {where}: expected a JSON object, got "
                                  f"{type(record).__name__}")
    return [record for _, record in numbered]


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SelfReplayError(f"data {path}: reading .parquet needs pyarrow (pip install 'selfreplay[parquet]')") \
            from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for bad files
        raise SelfReplayError(f"data {path}: not a readable parquet file ({_first_line(e)})") from None


def _load_hub(source: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise SelfReplayError(f"data {source}: loading a hub dataset needs extras: {HF_EXTRAS}") from None
    name, _, config = source.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline, unknown name, unknown split...
        raise SelfReplayError(f"data {source}: not a local file and `datasets` could not load it "
                              f"(split {split!r}): {_first_line(e)}") from None
    return [dict(r) for r in dataset]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --- formats -----------------------------------------------------------------------------------------------------

def detect_format(records: Sequence[dict], text_field: str = "text", source: str = "data") -> str:
    """``"messages"``, ``"prompt_completion"`` or ``"text"``, from the fields of the first record.

    Every record must have the same kind of fields; the error names the first one that does not.
    """
    if not records:
        raise SelfReplayError(f"{source}: no records (empty)")
    first = records[0]
    if "messages" in first:
        fmt, needed = "messages", ("messages",)
    elif "prompt" in first and "completion" in first:
        fmt, needed = "prompt_completion", ("prompt", "completion")
    elif text_field in first:
        fmt, needed = "text", (text_field,)
    else:
        raise SelfReplayError(f"{source}: record 1 has fields {sorted(first)}; expected {text_field!r}, "
                              f"'messages', or 'prompt' and 'completion'")
    for i, record in enumerate(records, 1):
        missing = [f for f in needed if f not in record]
        if missing:
            raise SelfReplayError(f"{source}: record {i} lacks field {missing[0]!r} (record 1 is in {fmt} format)")
    return fmt


@dataclass
class TokenizedExample:
    """One tokenized record; ``loss_mask[i]`` says whether token i is a training target."""

    input_ids: list[int]
    loss_mask: list[bool]


def tokenize_records(records: Sequence[dict], tokenizer, format: str, text_field: str = "text",
                     add_eos: bool = True, source: str = "data") -> list[TokenizedExample]:
    """Tokenize records of one :func:`detect_format` format with a Hugging Face tokenizer."""
    if format not in FORMATS:
        raise SelfReplayError(f"{source}: unknown data format {format!r}; expected one of {FORMATS}")
    if format == "text":
        return _tokenize_texts(records, tokenizer, text_field, add_eos, source)
    out = []
    for i, record in enumerate(records, 1):
        where = f"{source}: record {i}"
        if format == "messages":
            out.append(tokenize_chat(_messages(record.get("messages"), where), tokenizer, where))
        else:
            out.append(_tokenize_prompt_completion(record, tokenizer, add_eos, where))
    return out


def _tokenize_texts(records: Sequence[dict], tokenizer, text_field: str, add_eos: bool,
                    source: str) -> list[TokenizedExample]:
    """Plain documents, tokenized in batches (much faster than one call each); every token is a target."""
    texts = [_string(r.get(text_field), f"{source}: record {i}", text_field) for i, r in enumerate(records, 1)]
    out = []
    for start in range(0, len(texts), 1000):
        for ids in tokenizer(texts[start:start + 1000])["input_ids"]:
            ids = _with_eos(list(ids), tokenizer, source) if add_eos else list(ids)
            out.append(TokenizedExample(ids, [True] * len(ids)))
    return out


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise SelfReplayError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise SelfReplayError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SelfReplayError(f"{where}: each message must be an object with string 'role' and 'content', "
                                  f"got {json.dumps(m, default=str)[:80]}")
    return value


def _with_eos(ids: list[int], tokenizer, where: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SelfReplayError(f"{where}: the tokenizer has no EOS token to end documents with")
    return ids if ids and ids[-1] == eos else ids + [eos]


def tokenize_chat(messages: list[dict], tokenizer, where: str = "data") -> TokenizedExample:
    """Render a conversation with the chat template; only assistant replies (with their end-of-turn) are targets.

    Works for templates without ``{% generation %}`` markers: reply k spans the characters between the rendering
    of messages[:k] plus the generation prompt and the rendering of messages[:k+1]. Those renderings must be
    prefixes of the whole conversation's (true of ordinary templates; not of ones that rewrite earlier turns).
    Tokens are assigned to spans by their character offsets in the whole rendering, so BPE merges across a
    boundary cannot shift the mask.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise SelfReplayError(f"{where}: chat 'messages' need a tokenizer with a chat template")
    full = _render(tokenizer, messages, False, where)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = _render(tokenizer, messages[:k], True, where)
        end_text = _render(tokenizer, messages[:k + 1], False, where)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise SelfReplayError(f"{where}: the chat template does not render conversations incrementally "
                                  f"(message {k + 1} changes the text before it), so assistant tokens cannot be "
                                  f"located")
        spans.append((len(start_text), len(end_text)))
    ids, starts = _tokenize_with_offsets(tokenizer, full)
    mask = [any(a <= s < b for a, b in spans) for s in starts]
    return TokenizedExample(ids, mask)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template itself may reject the conversation (e.g. role order)
        raise SelfReplayError(f"{where}: the chat template failed: {_first_line(e)}") from None


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (as apply_chat_template tokenizes it: no added special tokens) and each token's
    start character."""
    if not getattr(tokenizer, "is_fast", False):
        raise SelfReplayError("assistant-only loss masks need a fast tokenizer (one with offset mappings)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]


def _tokenize_prompt_completion(record: dict, tokenizer, add_eos: bool, where: str) -> TokenizedExample:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt/completion (as in TRL)
        return tokenize_chat(_messages(prompt + completion, where), tokenizer, where)
    prompt, completion = _string(prompt, where, "prompt"), _string(completion, where, "completion")
    if getattr(tokenizer, "chat_template", None):
        return tokenize_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             tokenizer, where)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if add_eos:
        completion_ids = _with_eos(completion_ids, tokenizer, where)
    return TokenizedExample(prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids))


def tokenize_source(source, tokenizer, split: str = "train", text_field: str = "text") -> tuple[list[TokenizedExample], str]:
    """Load (a path, hub name, ``datasets.Dataset`` or list of records), detect the format and tokenize: the
    examples and their format."""
    where = f"data {source}" if isinstance(source, str) else "data"
    records = load_records(source, split, text_field) if isinstance(source, str) else [dict(r) for r in source]
    fmt = detect_format(records, text_field, source=where)
    return tokenize_records(records, tokenizer, fmt, text_field, source=where), fmt
