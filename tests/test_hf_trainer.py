"""Finetuning Hugging Face models end to end on CPU: LoRA and full finetuning with KL self-generated replay."""

import json

import pytest
import torch

from conftest import one_line_error
from selfreplay.config import describe_config, load_config
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_qwen2  # noqa: E402
from selfreplay.hf_trainer import HFTrainConfig, HFTrainer, validate_hf_config  # noqa: E402


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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_cli_finetunes_with_kl_self_replay_and_saves_a_loadable_model(hf_files, tmp_path, arch, lora):
    from transformers import AutoModelForCausalLM

    from selfreplay.cli import main
    from selfreplay.hf_model import load_tokenizer

    run_dir = tmp_path / "run"
    extra = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2} if lora else {}
    main(["finetune", *tiny_args(hf_files[arch], hf_files["chat"], run_dir, **extra)])
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 4, 8]
    assert records[0]["valid_kl"] == pytest.approx(0.0, abs=1e-6)  # student == teacher before training
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 0.3
    assert records[-1]["train_ntp"] < records[1]["train_ntp"]
    assert 0 < records[-1]["train_replay"] < 1.0 and records[-1]["valid_kl"] > 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["lora"] == lora and "git_commit" in info
    assert (info["trainable_params"] < info["params"] / 2) if lora else info["trainable_params"] == info["params"]
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # LoRA merged: plain transformers loads it
    assert type(loaded).__name__.lower().startswith(arch)
    summary = json.loads((run_dir / "summary.json").read_text())
    tok = load_tokenizer(str(run_dir / "model"))
    # the saved weights give exactly the trained model's final validation loss
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


def write_mcq_jsonl(path):
    """Questions whose choices the tiny tokenizer knows (answers as index or letter)."""
    questions = [("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"], 0),
                 ("Which animal barks?", ["cat", "dog", "fish", "bird"], "B"),
                 ("What colour is the sky?", ["green", "red", "blue", "yellow"], 2),
                 ("How many legs does a spider have?", ["six", "four", "ten", "eight"], "D"),
                 ("Which one is a fruit?", ["apple", "stone", "chair", "sand", "none"], 0)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in questions))
    return str(path)


def masked_nll(model, rows):
    """Mean NLL of a model over every target token of PackedRows, from its full logits."""
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows.input_ids[:, 1:].reshape(-1),
                                            reduction="none")
    mask = rows.loss_mask[:, 1:].reshape(-1).float()
    return ((nll * mask).sum() / mask.sum()).item()


@pytest.mark.parametrize("lora", [True, False], ids=["lora_kl", "full_no_replay"])
def test_evaluations_track_forgetting_and_benchmarks(hf_files, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    from selfreplay.hf_data import prepare_hf_data
    from selfreplay.hf_model import load_tokenizer
    from selfreplay.hf_trainer import train_hf
    from selfreplay.multiple_choice import load_questions, multiple_choice_accuracy

    mcq = [write_mcq_jsonl(tmp_path / "a" / "quiz.jsonl"), write_mcq_jsonl(tmp_path / "b" / "quiz.jsonl")]
    extra = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2} if lora else {"replay.method": "none"}
    run_dir = tmp_path / "run"
    train_hf(load_config(HFTrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], run_dir, **extra, **{
        "eval.prev": hf_files["text"], "eval.mcq": f"[{mcq[0]},{mcq[1]}]"})))
    records = read_metrics(run_dir)
    tok = load_tokenizer(hf_files["llama"])
    prev = prepare_hf_data(hf_files["text"], tok, 32)
    start = AutoModelForCausalLM.from_pretrained(hf_files["llama"])
    questions = load_questions(mcq[0])
    first, last = records[0], records[-1]
    assert first["prev_loss"] == pytest.approx(masked_nll(start, prev), rel=1e-5)
    assert first["forgetting"] == pytest.approx(0.0, abs=1e-6)
    if lora:
        assert first["prev_kl"] == pytest.approx(0.0, abs=1e-6) and last["prev_kl"] > 0
    else:
        assert "prev_kl" not in first  # no teacher in memory: the step-0 loss is the teacher's
    for r in records:
        assert r["prev_teacher_loss"] == pytest.approx(first["prev_loss"], rel=1e-5)
        assert r["forgetting"] == pytest.approx(r["prev_loss"] - r["prev_teacher_loss"], abs=1e-9)
    assert last["forgetting"] != 0
    final = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert last["prev_loss"] == pytest.approx(masked_nll(final, prev), rel=1e-4)
    for record, model in ((first, start), (last, final)):  # chat format: the tokenizer has a template
        expected = multiple_choice_accuracy(model, tok, questions, chat=True)["accuracy"]
        assert record["mcq_quiz_accuracy"] == record["mcq_quiz_2_accuracy"] == pytest.approx(expected)
        assert record["mcq_average_accuracy"] == pytest.approx(expected)


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
           "stop.steps=null": "stop", "eval.mcq_format=html": "eval.mcq_format"}
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
