import pytest

from selfreplay.config import TrainConfig, describe_config, load_config, validate_train_config
from selfreplay.errors import SelfReplayError


def _valid(**over):
    base = ["data.train=x", "run_dir=r", "stop.steps=10"]
    return load_config(TrainConfig, [], base + [f"{k}={v}" for k, v in over.items()])


def test_defaults_reproduce_the_paper():
    cfg = TrainConfig()
    m, o = cfg.model, cfg.optim
    assert (m.d_model, m.n_layers, m.head_dim, m.context, m.vocab_size) == (256, 6, 64, 256, 4096)
    assert (cfg.data.batch_size, o.lr, o.beta1, o.beta2, o.weight_decay, o.warmup_tokens) == \
        (256, 1e-3, 0.9, 0.999, 0.02, 10_000_000)
    assert (cfg.replay.coeff, cfg.replay.batch_size, cfg.replay.buffer, cfg.replay.temperature) == (10.0, 64, 16, 1.0)
    assert cfg.replay.divergence == "forward_kl"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\nmodel:\n  d_model: 128\n")
    cfg = load_config(TrainConfig, [str(path)], ["model.d_model=64", "stop.target_loss=3.2"])
    assert cfg.optim.lr == 3e-4 and cfg.model.d_model == 64 and cfg.stop.target_loss == 3.2


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean optim.lr?)"),
    ("optim.lr=fast", "bad value for 'optim.lr'"),
    ("model.n_layers=2.5", "bad value for 'model.n_layers'"),
    ("nonsense", "expected key.sub=value"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(SelfReplayError, match="not found"):
        load_config(TrainConfig, [str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(SelfReplayError, match="not valid YAML"):
        load_config(TrainConfig, [str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(SelfReplayError, match="unknown config key"):
        load_config(TrainConfig, [str(unknown)])


def test_stop_criteria_validation():
    with pytest.raises(SelfReplayError, match="conflicting length criteria stop.tokens, stop.steps"):
        validate_train_config(_valid(**{"stop.tokens": 100}), finetune=False)
    cfg = _valid()
    cfg.stop.steps = None
    with pytest.raises(SelfReplayError, match="no stop criterion"):
        validate_train_config(cfg, finetune=False)
    cfg.stop.target_loss = 3.0
    validate_train_config(cfg, finetune=False)  # a target alone is a valid criterion
    cfg.optim.schedule = "cosine"
    with pytest.raises(SelfReplayError, match="cosine needs a length"):
        validate_train_config(cfg, finetune=False)


def test_replay_needs_finetuning_and_valid_choices():
    with pytest.raises(SelfReplayError, match="replay needs a teacher"):
        validate_train_config(_valid(**{"replay.method": "kl"}), finetune=False)
    with pytest.raises(SelfReplayError, match="replay.method"):
        validate_train_config(_valid(**{"replay.method": "magic"}), finetune=False)
    with pytest.raises(SelfReplayError, match="init_from"):
        validate_train_config(_valid(), finetune=True)


def test_describe_config_lists_every_key():
    text = describe_config(TrainConfig)
    for key in ("model.d_model=256", "replay.coeff=10.0", "stop.target_loss=None", "optim.schedule='constant'"):
        assert key in text
