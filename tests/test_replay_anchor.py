"""Weight-space baselines (l2_init, ewc) against independent computations; zero at step 0."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.data.batch import Batch
from selfreplay.models.builtin import init_gpt, wrap_gpt
from selfreplay.models.gpt import GPTConfig
from selfreplay.replay.anchor import WeightAnchor, diagonal_fisher
from selfreplay.replay.penalty import ReplayPenalty
from selfreplay.models import load_model
from selfreplay.train import prepare, train
from selfreplay.train.checkpoint import load_checkpoint_state
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer

SHAPE = GPTConfig(d_model=32, n_layers=1, head_dim=16, context=12, vocab_size=40)


def _moved(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def test_l2_init_is_the_squared_distance_from_the_start_and_zero_at_step_0():
    model = wrap_gpt(init_gpt(SHAPE, 0))
    start = {k: v.clone() for k, v in model.named_parameters()}
    anchor = WeightAnchor(model)
    anchor.bind(model)
    assert float(anchor.term()) == 0.0
    _moved(model)
    expected = sum(((p - start[k]) ** 2).sum() for k, p in model.named_parameters())
    assert float(anchor.term()) == pytest.approx(float(expected), rel=1e-6)
    grad = torch.autograd.grad(anchor.term(), model.net.head.weight)[0]
    torch.testing.assert_close(grad, 2 * (model.net.head.weight - start["net.head.weight"]).detach())


def test_ewc_fisher_is_the_mean_squared_per_sequence_gradient():
    model = wrap_gpt(init_gpt(SHAPE, 0))
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(11, 40, (5, 12), generator=g)
    fisher = diagonal_fisher(model, [Batch(rows[:3]), Batch(rows[3:])], num_sequences=4)
    # independently: full logits, one sequence at a time, the summed NLL of its 11 targets, squared over 11
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        logits = model(rows[i:i + 1])
        loss = F.cross_entropy(logits[0, :-1], rows[i, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for (k, _), gr in zip(model.named_parameters(), grads):
            if gr is not None:
                expected[k] += gr ** 2 / 11 / 4
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())

    anchor = WeightAnchor(model)
    anchor.weights = fisher
    anchor.bind(model)
    start = {k: v.clone() for k, v in model.named_parameters()}
    assert float(anchor.term()) == 0.0
    _moved(model)
    ewc = sum((fisher[k] * (p - start[k]) ** 2).sum() for k, p in model.named_parameters())
    assert float(anchor.term()) == pytest.approx(float(ewc), rel=1e-5)


@torch.no_grad()
def _own_samples(model, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """``rows`` sequences the model samples itself at temperature 1 from token 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(rows, 1, dtype=torch.long)
    while tokens.shape[1] < length:
        probs = torch.softmax(model(tokens)[:, -1].float(), -1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=g)], 1)
    return tokens


def test_the_ewc_fisher_is_per_token_whatever_the_context_length():
    model = wrap_gpt(init_gpt(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=64, vocab_size=40), 0))
    samples = _own_samples(model, 64, 64)
    total = {}
    for length in (16, 64):  # prefixes of the model's own samples are its samples at that length
        fisher = diagonal_fisher(model, [Batch(samples[:, :length])], num_sequences=64)
        total[length] = sum(float(f.sum()) for f in fisher.values())
    assert 0.75 < total[64] / total[16] < 1.33  # the gradient of the mean NLL: 15 / 63 = 0.24


@pytest.mark.parametrize("source", ["self", "prev"])
def test_ewc_run_estimates_the_fisher_from_its_replay_source_and_resumes_with_it(corpora, pretrained, tmp_path,
                                                                                 source, monkeypatch):
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.method": "ewc", "replay.source": source,
        "replay.ewc_sequences": 6, "replay.batch_size": 4, "stop.steps": 4})
    cfg, kind, info = prepare(load_config(TrainConfig, [], args), FINETUNE)
    parts = build_parts(cfg, kind, FINETUNE, info.device)
    trainer = Trainer(cfg, parts, info.device)
    fisher = trainer.penalty.anchor.weights
    assert fisher is not None and sum(float(f.sum()) for f in fisher.values()) > 1e-4
    assert float(trainer.penalty.weight_term()) == 0.0  # step 0: the weights are the anchor's
    assert float(trainer.train_step()["replay"]) == 0.0  # the term of the step's loss: before its update
    assert float(trainer.train_step()["replay"]) > 1e-4  # the weights moved

    def stop_at_3(step):
        if step == 3:
            raise KeyboardInterrupt

    def interrupted(name):
        run_args = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={tmp_path / name}"]
        return load_config(TrainConfig, [], [*run_args, "checkpoint.every_steps=2"])

    train(interrupted("straight"), FINETUNE)
    with pytest.raises(KeyboardInterrupt):  # after the step-2 checkpoint
        train(interrupted("resumed"), FINETUNE, on_step=stop_at_3)
    saved = load_checkpoint_state(tmp_path / "resumed")["penalty"]["anchor"]
    assert set(saved) == set(fisher) and all(torch.equal(saved[k], f) for k, f in fisher.items())
    monkeypatch.setattr(ReplayPenalty, "estimate_fisher", lambda *a: pytest.fail("re-estimated on resume"))
    train(interrupted("resumed"), FINETUNE, resume=True)  # the Fisher comes from the checkpoint ...
    straight, resumed = (dict(load_model(str(tmp_path / n), "cpu").named_parameters()) for n in ("straight", "resumed"))
    assert all(torch.equal(resumed[k], w) for k, w in straight.items())  # ... and is the same


def test_weight_methods_need_an_anchor():
    model = wrap_gpt(init_gpt(SHAPE, 0))
    with pytest.raises(ValueError, match="WeightAnchor"):
        ReplayPenalty("l2_init", 1.0)
    with pytest.raises(ValueError, match="WeightAnchor"):
        ReplayPenalty("kl_downstream", 1.0, teacher=object(), anchor=WeightAnchor(model))
