"""Finetuning Hugging Face models end to end on CPU: LoRA and full finetuning with KL self-generated replay."""

import json
import random

import pytest
import torch

from conftest import one_line_error
from selfreplay.config import describe_config, load_config
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402
from selfreplay.hf_trainer import HFTrainConfig, HFTrainer, validate_hf_config  # noqa: E402


def write_chat_jsonl(path, n=160, seed=0):
    """Synthetic chats: 'add a and b' -> 'the answer is a+b' (only the replies are targets)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                             {"role": "assistant", "content": f"the answer is {a + b}"}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """Local model directories (tiny Llama and Qwen2 + tokenizer, saved with save_pretrained) and chat data."""
    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    for name, build in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        build(len(tok), seed=0).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    text = root / "old.jsonl"  # "previous distribution" plain text for real-data replay
    text.write_text("".join(json.dumps({"text": f"Once upon a time there was a model number {i}."}) + "\n"
                            for i in range(40)))
    return {"llama": str(root / "llama"), "qwen2": str(root / "qwen2"), "chat": write_chat_jsonl(root / "chat.jsonl"),
            "text": str(text)}


def tiny_args(model, data, run_dir, **extra) -> list[str]:
    """A run that takes a few seconds on one CPU core."""
    base = {"model_name_or_path": model, "data.train": data, "run_dir": run_dir, "data.seq_len": 32,
            "data.valid_rows": 8, "batch_size": 8, "replay.batch_size": 4, "replay.length": 16, "replay.buffer": 4,
            "optim.lr": 3e-3, "optim.warmup_tokens": 0, "stop.steps": 8, "eval.every_steps": 4,
            "log.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def valid_loss_of(model, hf_files, tok):
    """Masked validation NLL of a model on the same held-out rows the trainer used."""
    from selfreplay.hf_data import HFBatchLoader, prepare_hf_data

    loader = HFBatchLoader(prepare_hf_data(hf_files["chat"], tok, 32), 8, seed=0, valid_rows=8)
    total = count = 0.0
    with torch.no_grad():
        for ids, mask in loader.valid_batches(8):
            logits = model(input_ids=ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="none")
            total += (nll * mask[:, 1:].reshape(-1)).sum().item()
            count += mask[:, 1:].sum().item()
    return total / count


def test_cli_llama_lora_kl_self_replay(hf_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfreplay.cli import main
    from selfreplay.hf_model import load_tokenizer

    run_dir = tmp_path / "lora"
    lora = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2}
    main(["finetune", *tiny_args(hf_files["llama"], hf_files["chat"], run_dir, **lora)])
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 4, 8]
    assert records[0]["valid_kl"] == 0.0  # adapters start as a no-op: student == teacher
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 0.3
    assert records[-1]["train_ntp"] < records[1]["train_ntp"]
    assert 0 < records[-1]["train_replay"] < 1.0 and records[-1]["valid_kl"] > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["lora"] and info["trainable_params"] < info["params"] / 2 and "git_commit" in info
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # merged: plain transformers loads it
    summary = json.loads((run_dir / "summary.json").read_text())
    tok = load_tokenizer(str(run_dir / "model"))
    assert valid_loss_of(loaded, hf_files, tok) == pytest.approx(summary["valid_loss"], rel=1e-4)


def test_qwen2_full_finetuning_kl_self_replay_saves_the_trained_model(hf_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfreplay.hf_model import base_causal_lm

    run_dir = tmp_path / "full"
    cfg = load_config(HFTrainConfig, [], tiny_args(hf_files["qwen2"], hf_files["chat"], run_dir,
                                                   gradient_checkpointing=True, gradient_accumulation_steps=2,
                                                   **{"replay.max_logprobs_gib": 0}))  # teacher recomputed
    trainer = HFTrainer(cfg)
    summary = trainer.run()
    records = read_metrics(run_dir)
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 0.3
    assert summary["valid_kl"] > 0 and summary["steps"] == 8
    teacher_params = dict(trainer.teacher.module.named_parameters())
    vocab = trainer.teacher.module.config.vocab_size
    original = tiny_qwen2(vocab, seed=0)
    for name, p in original.named_parameters():  # the frozen teacher copy kept the starting weights
        torch.testing.assert_close(teacher_params[name], p, rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    trained = base_causal_lm(trainer.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_gradient_accumulation_matches_one_big_batch(hf_files, tmp_path):
    def first_steps(accum: int):
        cfg = load_config(HFTrainConfig, [], tiny_args(
            hf_files["llama"], hf_files["chat"], tmp_path / f"acc{accum}", gradient_accumulation_steps=accum,
            **{"replay.method": "none"}))
        trainer = HFTrainer(cfg)
        return [trainer.train_step()["loss"].item() for _ in range(3)]

    torch.testing.assert_close(first_steps(1), first_steps(4), rtol=1e-5, atol=1e-5)


def test_config_is_described_and_checked(hf_files, tmp_path):
    text = describe_config(HFTrainConfig)
    for key in ("model_name_or_path=", "lora.r=0", "replay.method='kl'", "replay.coeff=1.0", "replay.batch_size=32",
                "replay.prompt='bos'", "distributed.strategy='ddp'", "save.merge_lora=True"):
        assert key in text
    with pytest.raises(SelfReplayError) as e:
        load_config(HFTrainConfig, [], ["lora.rank=4"])
    one_line_error(e, "lora.rank", "lora.r")
    bad = {"batch_size=6": "gradient_accumulation_steps", "replay.method=kl_downstream": "replay.method",
           "replay.prompt=system": "replay.prompt", "distributed.strategy=zero3": "distributed.strategy",
           "stop.steps=null": "stop"}
    for override, word in bad.items():
        cfg = load_config(HFTrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], tmp_path,
                                                       gradient_accumulation_steps=4) + [override])
        with pytest.raises(SelfReplayError) as e:
            validate_hf_config(cfg, world=1)
        one_line_error(e, word)


def test_cli_dispatch_and_missing_extra(hf_files, tmp_path, monkeypatch, capsys):
    import sys

    from selfreplay.cli import _is_hf_config, main

    yaml = tmp_path / "hf.yaml"
    yaml.write_text(f"model_name_or_path: {hf_files['llama']}\n")
    assert _is_hf_config([str(yaml)], []) and not _is_hf_config([str(yaml)], ["model_name_or_path="])
    assert not _is_hf_config([], ["init_from=runs/x"])
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(yaml), *tiny_args(hf_files["llama"], hf_files["chat"], tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'selfreplay[hf]'" in err and "\n" not in err


def test_interrupted_run_resumes_to_the_same_result(hf_files, tmp_path):
    from selfreplay.hf_trainer import train_hf

    def args(run_dir):
        return tiny_args(hf_files["llama"], hf_files["chat"], run_dir, checkpoint_every_steps=2, **{
            "lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2, "stop.steps": 6, "eval.every_steps": 2})

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    straight = train_hf(load_config(HFTrainConfig, [], args(tmp_path / "a")))
    with pytest.raises(KeyboardInterrupt):
        train_hf(load_config(HFTrainConfig, [], args(tmp_path / "b")), on_step=interrupt)
    assert (tmp_path / "b" / "train_state" / "state.pt").is_file()
    with pytest.raises(SelfReplayError) as e:
        train_hf(load_config(HFTrainConfig, [], args(tmp_path / "b")))
    one_line_error(e, "--resume")
    resumed = train_hf(load_config(HFTrainConfig, [], args(tmp_path / "b")), resume=True)
    assert not (tmp_path / "b" / "train_state").exists()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [0, 2, 4, 6]
    for key in ("train_loss", "train_replay", "valid_loss", "valid_kl"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5), key
    assert resumed["valid_loss"] == pytest.approx(straight["valid_loss"], rel=1e-5)


def test_real_data_replay_source(hf_files, tmp_path):
    from selfreplay.hf_generate import RowReplay

    cfg = load_config(HFTrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], tmp_path / "real", **{
        "replay.source": hf_files["text"], "stop.steps": 4}))
    trainer = HFTrainer(cfg)
    assert isinstance(trainer.replay, RowReplay)
    batch = trainer.replay.next_batch()
    assert batch.tokens.shape == (4, 16) and batch.teacher_logprobs is None
    summary = trainer.run()
    records = read_metrics(tmp_path / "real")
    assert records[-1]["train_replay"] > 0 and summary["valid_loss"] < records[0]["valid_loss"]
