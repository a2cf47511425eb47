"""The training loop on Hugging Face models, end to end on CPU: tiny Llama / Qwen2, LoRA and full finetuning with
KL self-generated replay, forgetting and benchmark tracking, gradient accumulation, resuming, real-data replay."""

import json

import pytest
import torch

from conftest import one_line_error
from selfreplay.config import FINETUNE, TrainConfig, describe_config, load_config
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_qwen2  # noqa: E402
from selfreplay.evaluate.metrics import read_metrics  # noqa: E402
from selfreplay.train import model_kind_of, prepare, train  # noqa: E402
from selfreplay.train import checkpoint as ckpt  # noqa: E402
from selfreplay.train.build import build_parts  # noqa: E402
from selfreplay.train.loop import Trainer  # noqa: E402


def tiny_args(model, data, run_dir, **extra) -> list[str]:
    """A run that takes a few seconds on one CPU core (chats are one example per row: seq_len 64 holds one)."""
    base = {"model.model_name_or_path": model, "data.train": data, "run_dir": run_dir, "data.seq_len": 64,
            "data.valid_examples": 8, "data.batch_size": 8, "replay.batch_size": 4, "replay.length": 16,
            "replay.buffer": 4, "optim.lr": 3e-3, "optim.warmup_tokens": 0, "stop.steps": 8, "eval.every_steps": 4,
            "log.progress": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def make_trainer(args: list[str], **kwargs) -> Trainer:
    cfg, kind, info = prepare(load_config(TrainConfig, [], args), FINETUNE)
    assert kind == "hf"
    return Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device, **kwargs)


def _at_most(steps):
    """on_step of a resumed run: fail at once (rather than loop for ever) if it runs past its stop.steps."""
    def hook(s):
        assert s <= steps, f"the resumed run went on past stop.steps={steps} (step {s})"
    return hook


def held_out_rows(source, tok, valid_examples, evaluate_all=False):
    """The held-out rows the trainer evaluates on (same split, same row layout)."""
    from selfreplay.data.rows import RowLoader
    from selfreplay.data.text import tokenize_source

    examples, fmt = tokenize_source(source, tok)
    loader = RowLoader(examples, fmt, 64, int(tok.pad_token_id), 4, seed=0, valid_examples=valid_examples,
                       evaluate_all=evaluate_all)
    return list(loader.valid_batches(8))


def masked_nll(model, batches):
    """Mean NLL over every target token of the batches, from a plain transformers model's full logits."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b.tokens).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b.tokens[:, 1:].reshape(-1),
                                                    reduction="none")
            mask = b.mask()[:, 1:].reshape(-1)
            total += (nll * mask).sum().item()
            count += mask.sum().item()
    return total / count


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_cli_finetunes_with_kl_self_replay_and_saves_a_loadable_model(hf_files, tmp_path, arch, lora):
    from transformers import AutoModelForCausalLM

    from selfreplay.cli import main
    from selfreplay.models.hf import load_tokenizer

    run_dir = tmp_path / "run"
    extra = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2} if lora else {}
    main(["finetune", *tiny_args(hf_files[arch], hf_files["chat"], run_dir, **extra)])  # the default: KL replay
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 4, 8]
    assert records[0]["valid_kl"] == pytest.approx(0.0, abs=1e-6)  # student == teacher before training
    # rank-4 adapters on the tiny random Llama level off after ~4 steps (about -0.2; full finetuning: over -1)
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - (0.15 if lora else 0.3)
    assert records[-1]["train_ntp"] < records[1]["train_ntp"]
    assert 1e-4 < records[-1]["train_replay"] < 1.0 and records[-1]["valid_kl"] > 1e-4
    assert records[-1]["replay_coeff"] == 1.0  # the Hugging Face default coefficient
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model_kind"] == "hf" and "git_commit" in info
    assert info["replay"]["method"] == "kl" and info["replay"]["source"] == "self"
    assert ("lora" in info) == lora
    params = info["params"]
    assert (params["trainable"] < params["actual"] / 2) if lora else params["trainable"] == params["actual"]
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")  # LoRA merged: plain transformers loads it
    assert type(loaded).__name__.lower().startswith(arch)
    summary = json.loads((run_dir / "summary.json").read_text())
    tok = load_tokenizer(str(run_dir / "model"))
    # the saved weights give exactly the trained model's final validation loss
    assert masked_nll(loaded, held_out_rows(hf_files["chat"], tok, 8)) == pytest.approx(summary["valid_loss"],
                                                                                       rel=1e-4)


def test_qwen2_full_finetuning_kl_self_replay_saves_the_trained_model(hf_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfreplay.models.hf import base_model

    run_dir = tmp_path / "full"
    trainer = make_trainer(tiny_args(hf_files["qwen2"], hf_files["chat"], run_dir, gradient_checkpointing=True,
                                     gradient_accumulation_steps=2, **{"replay.max_logprobs_gib": 0}))
    assert not trainer.penalty.source.keeps_targets  # no room for the sampling logits: the teacher runs again
    summary = trainer.run()
    records = read_metrics(run_dir)
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 0.3
    assert summary["valid_kl"] > 1e-4 and summary["steps"] == 8
    teacher_net = trainer.teacher.module.net
    teacher_params = dict(teacher_net.named_parameters())
    vocab = teacher_net.config.vocab_size
    original = tiny_qwen2(vocab, seed=0)
    for name, p in original.named_parameters():  # the frozen teacher copy kept the starting weights
        torch.testing.assert_close(teacher_params[name], p, rtol=0, atol=0)
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    ids = torch.randint(3, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    trained = base_model(trainer.model.net).eval()
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


@pytest.mark.parametrize("lora", [True, False], ids=["lora_kl", "full_no_replay"])
def test_evaluations_track_forgetting_and_benchmarks(hf_files, tmp_path, lora):
    from transformers import AutoModelForCausalLM

    from selfreplay.evaluate.multiple_choice import load_questions, multiple_choice_accuracy
    from selfreplay.models.hf import load_tokenizer

    mcq = [write_mcq_jsonl(tmp_path / "a" / "quiz.jsonl"), write_mcq_jsonl(tmp_path / "b" / "quiz.jsonl")]
    extra = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2} if lora else {"replay.method": "none"}
    run_dir = tmp_path / "run"
    train(load_config(TrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], run_dir, **extra, **{
        "eval.prev": hf_files["text"], "eval.mcq": f"[{mcq[0]},{mcq[1]}]"})), FINETUNE)
    records = read_metrics(run_dir)
    tok = load_tokenizer(hf_files["llama"])
    prev = held_out_rows(hf_files["text"], tok, 0, evaluate_all=True)  # old data only evaluated: all of it
    start = AutoModelForCausalLM.from_pretrained(hf_files["llama"])
    questions = load_questions(mcq[0])
    first, last = records[0], records[-1]
    assert first["prev_loss"] == pytest.approx(masked_nll(start, prev), rel=1e-5)
    assert first["forgetting"] == pytest.approx(0.0, abs=1e-6)
    # a teacher is kept whenever old data is evaluated (LoRA: adapters off), so prev_kl is always measured
    assert first["prev_kl"] == pytest.approx(0.0, abs=1e-6) and last["prev_kl"] > 1e-4
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
    assert "weight_norm" not in last and "drift" not in last  # parameter norms are the built-in GPT's


@pytest.mark.parametrize("method", ["none", "kl", "kl_downstream"])
def test_gradient_accumulation_matches_one_big_batch(hf_files, tmp_path, method):
    def first_steps(accum: int):
        trainer = make_trainer(tiny_args(hf_files["llama"], hf_files["chat"], tmp_path / f"acc{accum}",
                                         gradient_accumulation_steps=accum, **{"replay.method": method}))
        return [{k: v.item() for k, v in trainer.train_step().items()} for _ in range(3)]

    one, four = first_steps(1), first_steps(4)
    assert [set(s) for s in one] == [set(s) for s in four]
    for a, b in zip(one, four):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_config_is_described_and_checked(hf_files, tmp_path):
    text = describe_config(TrainConfig, FINETUNE)
    for key in ("model.model_name_or_path=", "lora.r=0", "replay.method=None", "replay.coeff=None",
                "replay.batch_size=None", "replay.prompt='bos'", "distributed.strategy='ddp'",
                "checkpoint.merge_lora=True", "data.seq_len=None", "data.packing='auto'", "model.dtype='float32'"):
        assert key in text, key
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], ["lora.rank=4"])
    one_line_error(e, "lora.rank", "lora.r")
    cfg, kind, _ = prepare(load_config(TrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], tmp_path)),
                           FINETUNE)
    assert kind == "hf" and (cfg.replay.method, cfg.replay.coeff, cfg.optim.beta2) == ("kl", 1.0, 0.997)
    bad = {"data.batch_size=6": "gradient_accumulation_steps", "replay.method=kl_fast": "replay.method",
           "replay.prompt=system": "replay.prompt", "distributed.strategy=zero3": "distributed.strategy",
           "stop.steps=null": "stop", "eval.mcq_format=html": "eval.mcq_format",
           "replay.domains=[1]": "replay.domains", "replay.stop_at_eos=true": "replay.stop_at_eos",
           "data.packing=rows": "data.packing", "data.too_long=wrap": "data.too_long"}
    for override, word in bad.items():
        cfg = load_config(TrainConfig, [], tiny_args(hf_files["llama"], hf_files["chat"], tmp_path,
                                                     gradient_accumulation_steps=4) + [override])
        with pytest.raises(SelfReplayError) as e:
            prepare(cfg, FINETUNE)
        one_line_error(e, word)


def test_model_kind_and_missing_extra(hf_files, pretrained, tmp_path, monkeypatch, capsys):
    import sys

    from selfreplay.cli import main

    def kind(model):
        return model_kind_of(load_config(TrainConfig, [], [f"model.model_name_or_path={model}"]), FINETUNE)

    assert kind(hf_files["llama"]) == "hf" and kind(pretrained) == "gpt"
    assert model_kind_of(TrainConfig(), "pretrain") == "gpt"
    yaml = tmp_path / "hf.yaml"
    yaml.write_text(f"model:\n  model_name_or_path: {hf_files['llama']}\n")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit) as e:
        main(["finetune", str(yaml), *tiny_args(hf_files["llama"], hf_files["chat"], tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'selfreplay[hf]'" in err and "\n" not in err


def test_interrupted_run_resumes_to_the_same_result(hf_files, tmp_path):
    def args(run_dir):
        return tiny_args(hf_files["llama"], hf_files["chat"], run_dir, **{
            "checkpoint.every_steps": 2, "lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2, "stop.steps": 6,
            "eval.every_steps": 2})

    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    straight = train(load_config(TrainConfig, [], args(tmp_path / "a")), FINETUNE)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], args(tmp_path / "b")), FINETUNE, on_step=interrupt)
    assert ckpt.latest_checkpoint(tmp_path / "b") == tmp_path / "b" / "checkpoints" / "step_00000004"
    assert (tmp_path / "b" / "checkpoints" / "step_00000004" / ckpt.STATE).is_file()
    assert not (tmp_path / "b" / "model").exists()
    with pytest.raises(SelfReplayError) as e:
        train(load_config(TrainConfig, [], args(tmp_path / "b")), FINETUNE)
    one_line_error(e, "--resume")
    resumed = train(load_config(TrainConfig, [], args(tmp_path / "b")), FINETUNE, resume=True, on_step=_at_most(6))
    assert not ckpt.checkpoint_dir(tmp_path / "b").exists()
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [0, 2, 4, 6]
    for key in ("train_loss", "train_replay", "valid_loss", "valid_kl"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5), key
    assert resumed["valid_loss"] == pytest.approx(straight["valid_loss"], rel=1e-5)


def test_real_data_replay_source(hf_files, tmp_path):
    from selfreplay.data.rows import RowLoader
    from selfreplay.replay.sources import DataReplay

    trainer = make_trainer(tiny_args(hf_files["llama"], hf_files["chat"], tmp_path / "real", **{
        "replay.source": hf_files["text"], "stop.steps": 4}))
    source = trainer.penalty.source
    assert isinstance(source, DataReplay) and isinstance(source.loader, RowLoader)
    start = source.state_dict()
    batch = source.next_batch()
    assert batch.tokens.shape == (4, 16) and batch.teacher_targets is None
    source.load_state_dict(start)
    summary = trainer.run()
    records = read_metrics(tmp_path / "real")
    assert records[-1]["train_replay"] > 1e-4 and summary["valid_loss"] < records[0]["valid_loss"]
    info = json.loads((tmp_path / "real" / "run.json").read_text())
    assert info["replay"] == {"method": "kl", "source": hf_files["text"]}
