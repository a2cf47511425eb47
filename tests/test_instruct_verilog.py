"""The paper's instruct experiment (§5.9): its config loads as a finetuning config with the paper's values, its data
recipe is right."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import one_line_error
from selfreplay.config import load_config
from selfreplay.errors import SelfReplayError

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "experiments" / "instruct_verilog.yaml"


def _data_script():
    spec = importlib.util.spec_from_file_location("instruct_verilog_data", ROOT / "experiments" /
                                                  "instruct_verilog_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _paper_config(*overrides: str):
    from selfreplay.config import TrainConfig
    from selfreplay.train.checks import resolve_defaults

    cfg = load_config(TrainConfig, [str(YAML)], list(overrides))
    return resolve_defaults(cfg, "hf", "finetune")


def test_yaml_is_the_papers_run_as_a_finetuning_config():
    from selfreplay.train.checks import validate

    cfg = _paper_config()
    validate(cfg, "hf", "finetune", 1)
    assert cfg.model.model_name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert (cfg.model.dtype, cfg.teacher.dtype, cfg.lora.r) == ("float32", "bfloat16", 0)
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.optim.lr, cfg.stop.epochs) == (128, 512, 1e-5, 5)
    assert (cfg.data.packing, cfg.data.valid_examples, cfg.data.train) == \
        ("auto", 39062, "work_data/verilog/train.jsonl")  # chats: one example per row
    o = cfg.optim
    assert (o.name, o.beta1, o.beta2, o.weight_decay, o.warmup_tokens, o.schedule) == \
        ("adamw", 0.9, 0.997, 0.02, 10_000_000, "constant")
    r = cfg.replay
    assert (r.method, r.coeff, r.source, r.prompt, r.temperature, r.batch_size, r.length, r.buffer) == \
        ("kl", 1.0, "self", "bos", 1.0, 32, 512, 32)
    assert (r.divergence, r.top_k, r.top_p, r.stop_at_eos) == ("forward_kl", None, None, False)
    assert cfg.eval.every_steps * cfg.data.batch_size * cfg.data.seq_len == pytest.approx(20e6, rel=0.01)
    assert cfg.data.valid_examples * cfg.data.seq_len == pytest.approx(20e6, rel=0.01)  # ~20M held-out tokens
    assert (cfg.eval.batch_size, cfg.eval.max_tokens) == (16, 2_000_000)
    assert [Path(p).name for p in cfg.eval.mcq] == ["mmlu.jsonl", "arc_challenge.jsonl", "commonsense_qa.jsonl"]
    assert (cfg.gradient_accumulation_steps, cfg.gradient_checkpointing, cfg.loss_chunk_size) == (8, True, 1024)
    # on 8 GPUs without accumulation, as the header says
    validate(_paper_config("gradient_accumulation_steps=1"), "hf", "finetune", 8)


def test_yaml_keys_of_the_old_layout_say_where_they_moved():
    for old, new in (("batch_size=64", "data.batch_size"), ("data.valid_rows=10", "data.valid_examples"),
                     ("eval.max_rows=10", "eval.max_tokens"), ("torch_dtype=bfloat16", "model.dtype"),
                     ("model_name_or_path=x", "model.model_name_or_path")):
        with pytest.raises(SelfReplayError) as e:
            _paper_config(old)
        one_line_error(e, f"'{old.split('=')[0]}' has moved to '{new}")


def test_pyranet_records_become_the_papers_chats():
    script = _data_script()
    code = "module add(input a, b, output y);\n  assign y = a ^ b;\nendmodule\n"
    meta = {"description": "A one-bit adder without carry output.", "rank": 15, "complexity": "Basic",
            "compile_status": "No error!", "compile_results": ""}
    chat = script.pyranet_to_chat({"code": code, "description": str(meta)})  # a Python-literal dict string
    assert chat == {"messages": [
        {"role": "user", "content": "Write the following Verilog program. A one-bit adder without carry output."},
        {"role": "assistant", "content": code.strip()}]}
    assert script.pyranet_to_chat({"code": code, "description": json.dumps(meta)}) == chat
    filtered = [
        {"code": code, "description": str({**meta, "compile_status": "Dependency issues!"})},
        {"code": code, "description": str({**meta, "description": "too short"})},
        {"code": "assign y = a;", "description": str(meta)},
    ]
    assert [script.pyranet_to_chat(r) for r in filtered] == [None, None, None]


def test_verilog_chats_train_on_the_code_only(tmp_path):
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_tokenizer

    from selfreplay.data.rows import make_rows, resolve_packing
    from selfreplay.data.text import tokenize_source

    script = _data_script()
    code = "module hello(output y); assign y = 1; endmodule"
    chat = script.pyranet_to_chat({"code": code, "description": str(
        {"description": "A module that outputs a constant one.", "compile_status": "No error!"})})
    assert script.write_jsonl([chat, chat], tmp_path / "train.jsonl") == 2
    tok = tiny_tokenizer()
    examples, fmt = tokenize_source(str(tmp_path / "train.jsonl"), tok)
    assert fmt == "messages"
    rows = make_rows(examples, 512, tok.pad_token_id, resolve_packing(_paper_config().data.packing, fmt))
    assert len(rows) == 2  # one chat per row
    for i in range(2):
        targets = tok.decode(rows.input_ids[i][rows.loss_mask[i]].tolist())
        assert targets.count(code) == 1 and "Write the following Verilog program" not in targets
