"""SelfReplaySFTTrainer: TRL's SFTTrainer plus the replay term, on a tiny Llama and a local tokenizer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from conftest import one_line_error  # noqa: E402
from hf_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

from selfreplay.errors import SelfReplayError  # noqa: E402

TEXTS = [f"Question: Which animal barks? A. cat B. dog C. fish D. bird Answer: B {i}" for i in range(32)]


@pytest.fixture(scope="module")
def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": TEXTS})


def _args(tmp_path, cls=None, **extra):
    """Tiny CPU settings: 4 optimizer steps of 4 rows, 2 accumulation micro-steps each, no saving."""
    if cls is None:
        from selfreplay.trl_trainer import SelfReplayConfig as cls
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, learning_rate=1e-2, max_length=32,
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(extra)
    return cls(**base)


def _train(trainer_cls, args, dataset, **kwargs):
    tok = tiny_tokenizer()
    trainer = trainer_cls(model=tiny_llama(len(tok)), args=args, train_dataset=dataset, processing_class=tok,
                          **kwargs)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def _teacher_kl(trainer, rows: torch.Tensor) -> float:
    """KL(teacher || model) averaged over the predicting positions of ``rows``, from full logits."""
    model = trainer.model.eval()
    with torch.no_grad():
        student = torch.log_softmax(model(input_ids=rows).logits.float(), dim=-1)[:, :-1]
        teacher = trainer.teacher.logprobs(rows)[:, :-1]
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_self_replay_term_is_logged_zero_at_start_then_positive(tmp_path, dataset):
    from selfreplay.trl_trainer import SelfReplaySFTTrainer

    args = _args(tmp_path, replay_batch_size=4, replay_length=12, replay_buffer=2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset)
    replay = [h["replay_loss"] for h in logs]
    assert len(replay) == 4 and all(v == v for v in replay)
    assert abs(replay[0]) < 1e-5  # the first step's micro-batches run before any update: student == teacher
    assert all(v > 1e-4 for v in replay[1:]), replay
    assert trainer.replay.batch_size == 2  # 4 replay rows per optimizer step over 2 micro-steps
    assert trainer.replay.refills >= 1 and trainer.replay.prompt_ids == [tiny_tokenizer().bos_token_id]
    # the teacher is still the model at construction, for scoring and for sampling (TRL patches the student's
    # forward; the frozen copy must not run through the student)
    x = trainer.replay.next_batch().tokens
    original = tiny_llama(len(tiny_tokenizer()))
    with torch.no_grad():
        want = torch.log_softmax(original(input_ids=x).logits.float(), -1)
        sampled_with = torch.log_softmax(trainer.teacher.generate_model(input_ids=x).logits.float(), -1)
    assert torch.allclose(trainer.teacher.logprobs(x), want, atol=1e-5)
    assert torch.allclose(sampled_with, want, atol=1e-5)
    assert _teacher_kl(trainer, x) > 1e-4  # while the student moved


def test_coeff_zero_equals_plain_sft_trainer(tmp_path, dataset):
    from trl import SFTConfig, SFTTrainer

    from selfreplay.trl_trainer import SelfReplaySFTTrainer

    _, plain = _train(SFTTrainer, _args(tmp_path, cls=SFTConfig), dataset)
    # a plain SFTConfig works too: the replay options come as keyword arguments
    replay_trainer, ours = _train(SelfReplaySFTTrainer, _args(tmp_path, cls=SFTConfig), dataset, replay_coeff=0.0)
    assert [h["loss"] for h in ours] == pytest.approx([h["loss"] for h in plain], rel=1e-6, abs=1e-7)
    assert all("replay_loss" not in h for h in ours)
    assert replay_trainer.teacher is None  # no copy when the penalty is off


def test_kl_replay_keeps_the_model_closer_to_its_teacher(tmp_path, dataset):
    from selfreplay.hf_replay import HFSelfReplay
    from selfreplay.trl_trainer import SelfReplaySFTTrainer

    kls = {}
    for coeff in (1e-6, 20.0):  # ~no penalty vs a strong one, same everything else
        trainer, logs = _train(SelfReplaySFTTrainer, _args(tmp_path, replay_coeff=coeff, replay_batch_size=8,
                                                           replay_length=12, learning_rate=3e-2), dataset)
        held_out = HFSelfReplay(trainer.teacher, tiny_tokenizer(), batch_size=16, length=12, seed=123).next_batch()
        kls[coeff] = _teacher_kl(trainer, held_out.tokens)
    assert kls[20.0] < 0.5 * kls[1e-6], kls


def test_lora_teacher_is_the_base_model_with_adapters_off(tmp_path, dataset):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from selfreplay.trl_trainer import SelfReplaySFTTrainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = _args(tmp_path, replay_batch_size=4, replay_length=12, learning_rate=5e-2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset, peft_config=lora)
    assert trainer.teacher.peft_model is not None  # no second copy of the weights
    replay = [h["replay_loss"] for h in logs]
    assert abs(replay[0]) < 1e-5 and replay[-1] > 1e-4, replay
    x = trainer.replay.next_batch().tokens
    with torch.no_grad():
        want = torch.log_softmax(tiny_llama(len(tiny_tokenizer()))(input_ids=x).logits.float(), -1)
    assert torch.allclose(trainer.teacher.logprobs(x), want, atol=1e-5)


def test_replay_from_old_dataset_with_ntp(tmp_path, dataset):
    from datasets import Dataset

    from selfreplay.trl_trainer import SelfReplaySFTTrainer

    old = Dataset.from_dict({"text": ["Once upon a time there was a tiny language model."] * 16})
    args = _args(tmp_path, replay_method="ntp", replay_batch_size=4, replay_length=8, max_steps=2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset, replay_source=old)
    from selfreplay.hf_generate import RowReplay

    assert isinstance(trainer.replay, RowReplay)
    # NTP of a random model over a ~400-token vocabulary: about log(400) = 6
    assert 4.0 < logs[0]["replay_loss"] < 8.0


def test_bad_replay_options_are_one_line_errors(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        _args(tmp_path, replay_method="mse")
    one_line_error(e, "replay_method", "kl", "ntp")
    with pytest.raises(SelfReplayError) as e:
        _args(tmp_path, replay_batch_size=0)
    one_line_error(e, "replay_batch_size")


def test_config_pickles_and_parses_from_the_command_line(tmp_path):
    import pickle

    from transformers import HfArgumentParser

    from selfreplay.trl_trainer import SelfReplayConfig

    args = _args(tmp_path, replay_coeff=3.0)
    again = pickle.loads(pickle.dumps(args))  # Trainer saves training_args.bin with checkpoints
    assert type(again) is type(args) and again.replay_coeff == 3.0 and again.learning_rate == args.learning_rate
    (parsed,) = HfArgumentParser(SelfReplayConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--replay_method", "ntp", "--replay_length", "64"])
    assert (parsed.replay_method, parsed.replay_length, parsed.replay_coeff) == ("ntp", 64, 1.0)


def test_without_trl_the_module_imports_and_the_class_names_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import selfreplay.trl_trainer as m\n"
            "from selfreplay.errors import SelfReplayError\n"
            "try:\n    m.SelfReplaySFTTrainer\nexcept SelfReplayError as e:\n    print('ERR', e)\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ERR SelfReplaySFTTrainer needs extras: pip install 'selfreplay[trl]'"
