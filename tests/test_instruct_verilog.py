"""The paper's instruct experiment (§5.9): its config loads as an HF finetuning config, its data recipe is right."""

import importlib.util
import json
from pathlib import Path

import pytest

from selfreplay.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _data_script():
    spec = importlib.util.spec_from_file_location("instruct_verilog_data", ROOT / "experiments" /
                                                  "instruct_verilog_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_yaml_is_the_papers_run_as_an_hf_train_config():
    from selfreplay.hf_trainer import HFTrainConfig, validate_hf_config

    cfg = load_config(HFTrainConfig, [str(ROOT / "experiments" / "instruct_verilog.yaml")], [])
    validate_hf_config(cfg, 1)
    assert cfg.model_name_or_path == "meta-llama/Llama-3.2-1B-Instruct"
    assert (cfg.batch_size, cfg.data.seq_len, cfg.optim.lr, cfg.stop.epochs) == (128, 512, 1e-5, 5)
    r = cfg.replay
    assert (r.method, r.coeff, r.source, r.prompt, r.temperature, r.batch_size, r.length) == \
        ("kl", 1.0, "self", "bos", 1.0, 32, 512)
    assert cfg.eval.every_steps * cfg.batch_size * cfg.data.seq_len == pytest.approx(20e6, rel=0.01)
    # on 8 GPUs without accumulation, as the header says
    validate_hf_config(load_config(HFTrainConfig, [str(ROOT / "experiments" / "instruct_verilog.yaml")],
                                   ["gradient_accumulation_steps=1"]), 8)


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

    from selfreplay.hf_data import prepare_hf_data

    script = _data_script()
    code = "module hello(output y); assign y = 1; endmodule"
    chat = script.pyranet_to_chat({"code": code, "description": str(
        {"description": "A module that outputs a constant one.", "compile_status": "No error!"})})
    assert script.write_jsonl([chat, chat], tmp_path / "train.jsonl") == 2
    tok = tiny_tokenizer()
    rows = prepare_hf_data(str(tmp_path / "train.jsonl"), tok, seq_len=256)
    targets = tok.decode(rows.input_ids[rows.loss_mask].tolist())
    assert targets.count(code) == 2 and "Write the following Verilog program" not in targets
