"""Prepare the data of experiments/instruct_verilog.yaml (paper §5.9) from the Hugging Face hub.

Writes into --out (default work_data/verilog):
- train.jsonl: bnadimi/PyraNet-Verilog as chats, filtered as in the paper (compile status "No error!", a
  description of at least 16 characters, code with ``module ... endmodule``), shuffled: user "Write the
  following Verilog program. {description}", assistant: the code;
- mmlu.jsonl (cais/mmlu test, 2,048 questions), arc_challenge.jsonl (ARC-Challenge test, 1,024) and
  commonsense_qa.jsonl (CommonsenseQA validation, 1,024), each shuffled with seed 42: the multiple-choice sets
  that `selfreplay eval --model ... --mcq FILE` scores.

Usage: python experiments/instruct_verilog_data.py [--out DIR] [--max-examples N] [--skip-benchmarks]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Optional

INSTRUCTION = "Write the following Verilog program. {description}"
VERILOG_DATASET = "bnadimi/PyraNet-Verilog"
MIN_DESCRIPTION_CHARS = 16
MODULE = re.compile(r"\bmodule\b.*\bendmodule\b", re.DOTALL)
BENCHMARKS = {  # file name: (hub id, config, split, questions kept)
    "mmlu": ("cais/mmlu", "all", "test", 2048),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", 1024),
    "commonsense_qa": ("tau/commonsense_qa", None, "validation", 1024),
}


def parse_description(raw) -> tuple[str, Optional[str]]:
    """(description, compile status) of a PyraNet ``description`` field: a dict, or its JSON / Python-literal
    text, with keys ``description`` and ``compile_status``; any other text is the description itself."""
    meta = raw
    if isinstance(raw, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                meta = parse(raw)
                break
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    if isinstance(meta, dict):
        return str(meta.get("description") or "").strip(), meta.get("compile_status")
    return (raw.strip() if isinstance(raw, str) else ""), None


def pyranet_to_chat(record: dict) -> Optional[dict]:
    """The paper's chat for one PyraNet record, or None when the record is filtered out."""
    description, status = parse_description(record.get("description"))
    code = record.get("code")
    if status is not None and str(status).strip() != "No error!":
        return None
    if len(description) < MIN_DESCRIPTION_CHARS or not isinstance(code, str) or not MODULE.search(code):
        return None
    return {"messages": [{"role": "user", "content": INSTRUCTION.format(description=description)},
                         {"role": "assistant", "content": code.strip()}]}


def write_jsonl(records: Iterable[dict], path: Path) -> int:
    """Write records as JSON lines atomically (temp file + rename); returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    os.replace(tmp, path)
    return count


def prepare_verilog(out_dir: Path, max_examples: Optional[int] = None, seed: int = 0) -> int:
    from datasets import load_dataset

    chats = [c for c in map(pyranet_to_chat, load_dataset(VERILOG_DATASET, split="train")) if c is not None]
    random.Random(seed).shuffle(chats)
    return write_jsonl(chats[:max_examples], out_dir / "train.jsonl")


def prepare_benchmarks(out_dir: Path, seed: int = 42) -> dict[str, int]:
    from datasets import load_dataset

    written = {}
    for name, (hub_id, config, split, keep) in BENCHMARKS.items():
        rows = [dict(r) for r in load_dataset(hub_id, config, split=split)]
        random.Random(seed).shuffle(rows)
        written[name] = write_jsonl(rows[:keep], out_dir / f"{name}.jsonl")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="work_data/verilog", help="output directory")
    parser.add_argument("--max-examples", type=int, default=None, help="keep at most this many Verilog chats")
    parser.add_argument("--skip-benchmarks", action="store_true", help="do not download the MCQ sets")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"{out / 'train.jsonl'}: {prepare_verilog(out, args.max_examples):,} chats")
    if not args.skip_benchmarks:
        for name, n in prepare_benchmarks(out).items():
            print(f"{out / (name + '.jsonl')}: {n:,} questions")


if __name__ == "__main__":
    main()
