"""SelfReplaySFTTrainer: TRL's SFTTrainer plus the engine's replay penalty, on a tiny Llama and a local tokenizer."""

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
        from selfreplay.integrations.trl import SelfReplayConfig as cls
    base = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, logging_steps=1, learning_rate=1e-2, max_length=32,
                report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(extra)
    return cls(**base)


def _trainer(trainer_cls, args, dataset, **kwargs):
    tok = tiny_tokenizer()
    return trainer_cls(model=tiny_llama(len(tok)), args=args, train_dataset=dataset, processing_class=tok, **kwargs)


def _train(trainer_cls, args, dataset, **kwargs):
    trainer = _trainer(trainer_cls, args, dataset, **kwargs)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _teacher_kl(trainer, rows: torch.Tensor) -> float:
    """KL(teacher || model) averaged over the predicting positions of ``rows``, from full logits."""
    model = trainer.model.eval()
    with torch.no_grad():
        student = _logprobs(model(input_ids=rows).logits)[:, :-1]
        teacher = _logprobs(trainer.teacher(rows))[:, :-1]
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def _replay(trainer):
    """The replay source the trainer built at its first step (SelfGeneratedReplay or DataReplay)."""
    return trainer.penalty.source.inner


def test_self_replay_term_is_logged_zero_at_start_then_positive(tmp_path, dataset):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer
    from selfreplay.replay.sources import SelfGeneratedReplay

    args = _args(tmp_path, replay_batch_size=4, replay_length=12, replay_buffer=2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset)
    replay = [h["replay_loss"] for h in logs]
    assert len(replay) == 4 and all(v == v for v in replay)
    assert abs(replay[0]) < 1e-5  # the first step's micro-batches run before any update: student == teacher
    assert all(v > 1e-4 for v in replay[1:]), replay
    source = _replay(trainer)
    assert isinstance(source, SelfGeneratedReplay)
    assert trainer.replay_rows_per_micro_step() == source.batch_size == 2  # 4 rows per step over 2 micro-steps
    assert source.refills >= 1 and source.prompts.rows == [[tiny_tokenizer().bos_token_id]]
    assert source.keeps_targets  # KL: the teacher's sampling logits are the targets
    # the teacher is still the model at construction, for scoring and for sampling (TRL patches the student's
    # forward; the frozen copy must not run through the student)
    x = source.next_batch().tokens
    assert x.shape == (2, 12)
    original = tiny_llama(len(tiny_tokenizer()))
    with torch.no_grad():
        want = _logprobs(original(input_ids=x).logits)
        sampled_with = _logprobs(trainer.teacher.forward_module(x))
    assert not trainer.teacher.shares_weights
    torch.testing.assert_close(_logprobs(trainer.teacher(x)), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampled_with, want, atol=1e-5, rtol=1e-5)
    assert _teacher_kl(trainer, x) > 1e-4  # while the student moved


def test_coeff_zero_equals_plain_sft_trainer(tmp_path, dataset):
    from trl import SFTConfig, SFTTrainer

    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    _, plain = _train(SFTTrainer, _args(tmp_path, cls=SFTConfig), dataset)
    # a plain SFTConfig works too: the replay options come as keyword arguments
    replay_trainer, ours = _train(SelfReplaySFTTrainer, _args(tmp_path, cls=SFTConfig), dataset, replay_coeff=0.0)
    assert [h["loss"] for h in ours] == pytest.approx([h["loss"] for h in plain], rel=1e-6, abs=1e-7)
    assert all("replay_loss" not in h for h in ours)
    assert replay_trainer.teacher is None and replay_trainer.penalty is None  # no copy when the penalty is off


def test_kl_replay_keeps_the_model_closer_to_its_teacher(tmp_path, dataset):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer
    from selfreplay.replay.prompts import Prompts
    from selfreplay.replay.sources import SelfGeneratedReplay

    kls = {}
    for coeff in (1e-6, 20.0):  # ~no penalty vs a strong one, same everything else
        trainer, logs = _train(SelfReplaySFTTrainer, _args(tmp_path, replay_coeff=coeff, replay_batch_size=8,
                                                           replay_length=12, learning_rate=3e-2), dataset)
        held_out = SelfGeneratedReplay(trainer.teacher, Prompts([[tiny_tokenizer().bos_token_id]]), batch_size=16,
                                       length=12, seed=123, keep_targets=False).next_batch()
        kls[coeff] = _teacher_kl(trainer, held_out.tokens)
    assert kls[20.0] < 0.5 * kls[1e-6], kls


def test_lora_teacher_is_the_base_model_with_adapters_off(tmp_path, dataset):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = _args(tmp_path, replay_batch_size=4, replay_length=12, learning_rate=5e-2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset, peft_config=lora)
    assert trainer.teacher.shares_weights  # no second copy of the weights
    assert trainer.teacher.module.net is trainer.replay_model.net
    replay = [h["replay_loss"] for h in logs]
    assert abs(replay[0]) < 1e-5 and replay[-1] > 1e-4, replay
    x = _replay(trainer).next_batch().tokens
    with torch.no_grad():
        want = _logprobs(tiny_llama(len(tiny_tokenizer()))(input_ids=x).logits)
    torch.testing.assert_close(_logprobs(trainer.teacher(x)), want, atol=1e-5, rtol=1e-5)
    assert _teacher_kl(trainer, x) > 1e-4  # the adapters moved the student


def test_replay_from_old_dataset_with_ntp(tmp_path, dataset):
    from datasets import Dataset

    from selfreplay.integrations.trl import IN_MEMORY_SOURCE, SelfReplaySFTTrainer
    from selfreplay.replay.sources import DataReplay

    old = Dataset.from_dict({"text": ["Once upon a time there was a tiny language model."] * 16})
    args = _args(tmp_path, replay_method="ntp", replay_batch_size=4, replay_length=8, max_steps=2)
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset, replay_source=old)
    assert isinstance(_replay(trainer), DataReplay)
    assert trainer.replay_settings.replay_source == IN_MEMORY_SOURCE
    assert trainer.teacher is not None and trainer.penalty.method == "ntp"
    # NTP of a random model over a ~400-token vocabulary: about log(400) = 6
    assert 4.0 < logs[0]["replay_loss"] < 8.0


def test_replay_batch_size_is_global(tmp_path, dataset):
    """replay_batch_size counts rows per optimizer step: with 2 accumulation micro-steps each replays half."""
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    trainer = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_batch_size=8, replay_length=8, replay_buffer=2,
                                                   max_steps=2), dataset)
    assert trainer.replay_rows_per_micro_step() == 4
    seen, original = [], trainer.next_replay

    def spy():
        batch = original()
        seen.append(len(batch))
        return batch

    trainer.next_replay = spy
    trainer.train()
    assert seen == [4] * 4  # 2 steps x 2 micro-steps, 4 rows each
    assert _replay(trainer).batch_size == 4 and _replay(trainer).refills == 1  # buffer 2 steps x 2 micro-steps
    odd = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_batch_size=5), dataset)
    assert odd.replay_rows_per_micro_step() == 3  # rounded up
    one = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_batch_size=5, gradient_accumulation_steps=1),
                   dataset)
    assert one.replay_rows_per_micro_step() == 5


def test_replay_forward_runs_under_the_trainers_autocast(tmp_path, dataset):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    try:
        args = _args(tmp_path, bf16=True, replay_batch_size=4, replay_length=8, max_steps=1)
    except (ValueError, SelfReplayError) as e:  # pragma: no cover - a TRL without bf16 on CPU
        pytest.skip(f"bf16 on CPU: {e}")
    trainer = _trainer(SelfReplaySFTTrainer, args, dataset)
    entered, autocast = [], trainer.accelerator.autocast

    def spy_autocast(*a, **k):
        entered.append(True)
        return autocast(*a, **k)

    states, sums = [], trainer.penalty.sums

    def spy_sums(model, batch, replay, **kw):
        states.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return sums(model, batch, replay, **kw)

    trainer.accelerator.autocast = spy_autocast
    trainer.penalty.sums = spy_sums
    trainer.train()
    assert len(states) == 2 and all(states), states  # both micro-steps' replay forwards ran in bf16 autocast
    assert entered


def test_compute_loss_reads_nothing_back_per_micro_step(tmp_path, dataset, monkeypatch):
    """No .item() (or other device-to-host read) per micro-step: replay_loss is gathered once per log step."""
    from trl import SFTTrainer

    import selfreplay
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    trainer = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_batch_size=4, replay_length=8, replay_buffer=4),
                       dataset)
    trainer.model.train()
    trainer.next_replay()  # build the source and sample its first buffer (a refill may read back; a step not)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # TRL's own SFT loss reads its metrics back; stub it to isolate what the replay term adds
    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda self, model, inputs, return_outputs=False,
                        num_items_in_batch=None: torch.zeros((), requires_grad=True))
    reads, ours = [], str(Path(selfreplay.__file__).parent)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename  # reads inside transformers' forward are not ours
            if caller.startswith(ours):
                reads.append(f"{_name} at {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer.current_gradient_accumulation_steps = 2
    losses = [trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=torch.tensor(10))
              for _ in range(3)]
    assert reads == [], reads
    assert trainer._replay_steps == 3 and all(loss.requires_grad for loss in losses)
    monkeypatch.undo()

    gathers, gather = [], trainer.accelerator.gather_for_metrics

    def spy_gather(x, *a, **k):
        gathers.append(x)
        return gather(x, *a, **k)

    trainer.accelerator.gather_for_metrics = spy_gather
    logged = []
    monkeypatch.setattr(SFTTrainer, "log", lambda self, logs, *a, **k: logged.append(dict(logs)))
    trainer.log({"loss": 1.0})
    assert len(gathers) == 1 and logged[0]["replay_loss"] > -1e-6  # one gather for the log step
    assert trainer._replay_steps == 0
    trainer.log({"loss": 1.0})  # nothing replayed since: nothing gathered
    assert len(gathers) == 1 and "replay_loss" not in logged[1]


def test_bad_replay_options_are_one_line_errors(tmp_path, dataset):
    with pytest.raises(SelfReplayError) as e:
        _args(tmp_path, replay_method="mse")
    one_line_error(e, "replay_method", "kl", "ntp")
    with pytest.raises(SelfReplayError) as e:
        _args(tmp_path, replay_batch_size=0)
    one_line_error(e, "replay_batch_size")
    with pytest.raises(SelfReplayError) as e:
        _args(tmp_path, replay_divergence="l2")
    one_line_error(e, "replay_divergence", "forward_kl")
    from trl import SFTConfig

    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    with pytest.raises(SelfReplayError) as e:  # keyword overrides are checked too
        _trainer(SelfReplaySFTTrainer, _args(tmp_path, cls=SFTConfig), dataset, replay_prompt="system")
    one_line_error(e, "replay_prompt", "bos", "chat")


def test_config_pickles_and_parses_from_the_command_line(tmp_path):
    import pickle

    from transformers import HfArgumentParser

    from selfreplay.integrations.trl import SelfReplayConfig

    args = _args(tmp_path, replay_coeff=3.0)
    again = pickle.loads(pickle.dumps(args))  # Trainer saves training_args.bin with checkpoints
    assert type(again) is type(args) and again.replay_coeff == 3.0 and again.learning_rate == args.learning_rate
    assert type(args).__module__ == "selfreplay.integrations.trl"
    (parsed,) = HfArgumentParser(SelfReplayConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--replay_method", "ntp", "--replay_length", "64"])
    assert (parsed.replay_method, parsed.replay_length, parsed.replay_coeff) == ("ntp", 64, 1.0)
    assert parsed.replay_batch_size == 32


def test_without_trl_the_module_imports_and_the_classes_name_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import selfreplay.integrations.trl as m\n"
            "from selfreplay.errors import SelfReplayError\n"
            "m.ReplaySettings(replay_method='ntp').check()\n"
            "for name in ('SelfReplaySFTTrainer', 'SelfReplayConfig'):\n"
            "    try:\n        getattr(m, name)\n    except SelfReplayError as e:\n        print('ERR', e)\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    message = "ERR SelfReplaySFTTrainer needs extras: pip install 'selfreplay[trl]'"
    assert out.stdout.strip().splitlines() == [message] * 2


# ------------------------------------------------------------------------------------------- baselines, budget

def _stub_sft_loss(monkeypatch):
    """TRL's own SFT loss replaced by 0, to read the penalty alone."""
    from trl import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda self, model, inputs, return_outputs=False,
                        num_items_in_batch=None: torch.zeros((), requires_grad=True))


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["asft", "kl_downstream"])
def test_data_kl_methods_match_the_kl_on_the_training_batch(tmp_path, dataset, monkeypatch, method):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    trainer = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_method=method, replay_coeff=0.5), dataset)
    assert trainer.args.loss_type == ("dft" if method == "asft" else "nll")  # asft: TRL computes the DFT half
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _stub_sft_loss(monkeypatch)
    trainer.model.train()
    assert float(trainer.compute_loss(trainer.model, dict(inputs))) == pytest.approx(0.0, abs=1e-6)  # student = teacher
    _perturb(trainer.model)
    got = float(trainer.compute_loss(trainer.model, dict(inputs)))
    with torch.no_grad():
        student = _logprobs(trainer.model(input_ids=inputs["input_ids"]).logits)[:, :-1]
        teacher = _logprobs(trainer.teacher(inputs["input_ids"]))[:, :-1]
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    mask = (inputs["labels"] != -100)[:, 1:].float()
    # (a small KL is a difference of log-probabilities ~6: float32 leaves ~1e-6 of it)
    assert got == pytest.approx(0.5 * float((per_position * mask).sum() / mask.sum()), abs=1e-5)
    assert got > 1e-3


@pytest.mark.parametrize("method", ["l2_init", "ewc"])
def test_weight_methods_penalise_the_distance_from_the_start(tmp_path, dataset, monkeypatch, method):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    trainer = _trainer(SelfReplaySFTTrainer, _args(tmp_path, replay_method=method, replay_coeff=2.0,
                                                   replay_ewc_sequences=4, replay_length=12), dataset)
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    _stub_sft_loss(monkeypatch)
    trainer.model.train()
    assert float(trainer.compute_loss(trainer.model, dict(inputs))) == 0.0
    _perturb(trainer.model)
    weights = trainer.penalty.anchor.weights
    if method == "ewc":
        assert weights is not None and sum(float(w.sum()) for w in weights.values()) > 1e-4
        assert isinstance(_replay(trainer), __import__("selfreplay.replay.sources", fromlist=["x"]).SelfGeneratedReplay)
    distance = sum(float(((weights["net." + k] if weights else 1.0) * (p - start[k]) ** 2).sum())
                   for k, p in trainer.model.named_parameters())
    assert float(trainer.compute_loss(trainer.model, dict(inputs))) == pytest.approx(2.0 * distance, rel=1e-4)


@pytest.mark.parametrize("target,direction", [(1e-6, "up"), (10.0, "down")])
def test_a_budget_moves_the_coefficient_the_right_way(tmp_path, dataset, target, direction):
    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    args = _args(tmp_path, replay_batch_size=4, replay_length=12, replay_buffer=2, replay_coeff=1.0,
                 replay_target_kl=target, replay_target_kl_smoothing=0.0)  # falls are held for 1 LR-weighted step
    trainer, logs = _train(SelfReplaySFTTrainer, args, dataset)
    coeffs = [h["replay_coeff"] for h in logs]
    assert len(coeffs) == 4 and all("replay_kl_smoothed" in h for h in logs)
    # (the first update is held: its KL is measured at the teacher's own weights, 0, under every target)
    assert (coeffs[-1] > max(1.0, *coeffs[:-1])) if direction == "up" else (coeffs[-1] < coeffs[0] == 1.0)
    assert trainer.penalty.budget.updates == 4  # once per optimizer step, not per micro-step


def test_bad_budgets_are_one_line_errors(tmp_path):
    for extra, words in [({"replay_target_kl": 0.0}, ["replay_target_kl=0.0"]),
                         ({"replay_target_kl": 0.1, "replay_method": "ntp"}, ["replay_target_kl", "ntp"]),
                         ({"replay_target_kl": 0.1, "replay_divergence": "jsd"},
                          ["replay_target_kl", "replay_divergence=jsd", "forward KL"])]:
        with pytest.raises(SelfReplayError) as e:
            _args(tmp_path, **extra)
        one_line_error(e, *words)


@pytest.mark.parametrize("settings", [
    dict(replay_method="ewc", replay_coeff=50.0, replay_ewc_sequences=4),
    dict(replay_method="kl", replay_coeff=1.0, replay_target_kl=1e-4, replay_buffer=1),
], ids=["ewc", "budget"])
def test_a_resumed_run_continues_the_penalty_and_equals_the_uninterrupted_one(tmp_path, dataset, settings):
    """TRL's checkpoint carries the budget's coefficient and average, EWC's Fisher and the replay stream: resuming
    from step 2 of 4 ends where the uninterrupted run ends (a restarted budget or a Fisher re-estimated from the
    finetuned model would not)."""
    from selfreplay.integrations.trl import PENALTY_STATE, SelfReplaySFTTrainer

    common = dict(replay_batch_size=4, replay_length=12, save_strategy="steps", save_steps=2, **settings)
    whole = _trainer(SelfReplaySFTTrainer, _args(tmp_path / "whole", **common), dataset)
    whole.train()
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-2"
    assert (checkpoint / PENALTY_STATE / "rank_0" / "state.json").is_file()
    resumed = _trainer(SelfReplaySFTTrainer, _args(tmp_path / "resumed", **common), dataset)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    if "replay_target_kl" in settings:
        assert float(resumed.penalty.coeff) == float(whole.penalty.coeff) != 1.0
        assert float(resumed.penalty.budget.updates) == 4.0
    else:
        assert all(torch.equal(resumed.penalty.anchor.weights[k], w) for k, w in whole.penalty.anchor.weights.items())
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_asft_trains_with_the_dft_loss_whatever_arguments_it_is_given(tmp_path, dataset):
    """Anchored SFT is DFT + the KL anchor: also when TRL builds its own SFTConfig (from plain TrainingArguments,
    as from args=None), whose loss_type defaults to plain NLL."""
    from transformers import TrainingArguments

    from selfreplay.integrations.trl import SelfReplaySFTTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = _trainer(SelfReplaySFTTrainer, args, dataset, replay_method="asft", replay_coeff=0.1)
    assert trainer.args.loss_type == "dft"
