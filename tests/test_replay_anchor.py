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
from selfreplay.train import prepare
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
    # independently: full logits, one sequence at a time, mean NLL over its 11 targets
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(4):
        logits = model(rows[i:i + 1])
        loss = F.cross_entropy(logits[0, :-1], rows[i, 1:])
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for (k, _), gr in zip(model.named_parameters(), grads):
            if gr is not None:
                expected[k] += gr ** 2 / 4
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


@pytest.mark.parametrize("source", ["self", "prev"])
def test_ewc_run_estimates_the_fisher_from_its_replay_source_and_resumes_with_it(corpora, pretrained, tmp_path,
                                                                                 source):
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
    state = trainer.penalty.state_dict()
    again = Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device, resume=True)
    assert again.penalty.anchor.weights is None  # a resumed run takes the Fisher from its checkpoint ...
    again.penalty.load_state_dict(state)
    for k, f in fisher.items():
        assert torch.equal(again.penalty.anchor.weights[k], f)  # ... exactly


def test_weight_methods_need_an_anchor():
    model = wrap_gpt(init_gpt(SHAPE, 0))
    with pytest.raises(ValueError, match="WeightAnchor"):
        ReplayPenalty("l2_init", 1.0)
    with pytest.raises(ValueError, match="WeightAnchor"):
        ReplayPenalty("kl_downstream", 1.0, teacher=object(), anchor=WeightAnchor(model))
