"""The run configuration: defaults (per model kind), YAML and overrides, one-line errors, the cross-field checks."""

import time

import pytest

from conftest import one_line_error
from selfreplay.config import (FINETUNE, MOVED_KEYS, PRETRAIN, TrainConfig, config_keys, describe_config,
                               load_config)
from selfreplay.errors import SelfReplayError
from selfreplay.train.checks import KIND_DEFAULTS, resolve_defaults, validate


def _valid(*extra: str, **over) -> TrainConfig:
    base = ["data.train=x", "run_dir=r", "stop.steps=10", *extra]
    return load_config(TrainConfig, [], base + [f"{k}={v}" for k, v in over.items()])


def _checked(cfg: TrainConfig, kind: str = "gpt", command: str = PRETRAIN) -> TrainConfig:
    """What a run does before building anything: per-kind defaults, then the checks."""
    validate(resolve_defaults(cfg, kind, command), kind, command)
    return cfg


def test_defaults_reproduce_the_paper():
    cfg = TrainConfig()
    m, o = cfg.model, cfg.optim
    assert (m.d_model, m.n_layers, m.head_dim, m.context, m.vocab_size) == (256, 6, 64, 256, 4096)
    assert (o.beta1, o.weight_decay, o.schedule) == (0.9, 0.02, "constant")
    # the paper's 10M warmup tokens: for a run of unknown length, and for any run of 100M tokens or more
    from selfreplay.train.optim import warmup_tokens_for

    assert (o.warmup_tokens, o.warmup_steps, o.warmup_ratio) == (None, None, None)
    assert warmup_tokens_for(o, 65_536, None) == warmup_tokens_for(o, 65_536, 2000) == 10_000_000
    assert (cfg.replay.temperature, cfg.replay.divergence, cfg.replay.source) == (1.0, "forward_kl", "auto")
    # the model-kind dependent ones are None until resolve_defaults fills them in
    assert (cfg.data.batch_size, o.lr, o.beta2, cfg.replay.coeff, cfg.replay.batch_size, cfg.replay.buffer,
            cfg.eval.batch_size, cfg.replay.method) == (None,) * 8
    gpt = resolve_defaults(TrainConfig(), "gpt", FINETUNE)
    assert (gpt.data.batch_size, gpt.optim.lr, gpt.optim.beta2) == (256, 1e-3, 0.999)  # the paper's §4
    assert (gpt.replay.coeff, gpt.replay.batch_size, gpt.replay.buffer, gpt.eval.batch_size) == (10.0, 64, 16, 64)
    assert gpt.replay.method == "kl" and gpt.eval.every_tokens == 10_000_000
    hf = resolve_defaults(TrainConfig(), "hf", FINETUNE)
    assert (hf.data.batch_size, hf.optim.lr, hf.optim.beta2) == (128, 1e-5, 0.997)  # its §5.9 instruct run
    assert (hf.replay.coeff, hf.replay.batch_size, hf.replay.buffer, hf.eval.batch_size) == (1.0, 32, 32, 8)
    for key, (g, h) in KIND_DEFAULTS.items():
        section, name = key.split(".")
        assert (getattr(getattr(gpt, section), name), getattr(getattr(hf, section), name)) == (g, h), key
    assert resolve_defaults(TrainConfig(), "gpt", PRETRAIN).replay.method == "none"


def test_resolve_defaults_keeps_what_was_set():
    cfg = _valid(**{"data.batch_size": 7, "replay.coeff": 0.0, "replay.method": "ntp", "eval.every_steps": 3})
    resolve_defaults(cfg, "hf", FINETUNE)
    assert (cfg.data.batch_size, cfg.replay.coeff, cfg.replay.method) == (7, 0.0, "ntp")
    assert cfg.eval.every_tokens is None and cfg.eval.every_steps == 3  # no token interval added
    gpt = resolve_defaults(_valid(**{"lora.r": 4}), "gpt", FINETUNE)
    assert (gpt.lora.alpha, gpt.lora.targets) == (4.0, ["qkv", "out", "up", "down"])  # the paper's alpha = r
    hf = resolve_defaults(_valid(**{"lora.r": 4}), "hf", FINETUNE)
    assert (hf.lora.alpha, hf.lora.targets) == (8.0, ["all-linear"])
    assert resolve_defaults(_valid(**{"lora.r": 4, "lora.alpha": 1}), "hf", FINETUNE).lora.alpha == 1.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3.0e-4\nmodel:\n  d_model: 128\n")
    later = tmp_path / "later.yaml"
    later.write_text("model:\n  n_layers: 2\n")
    cfg = load_config(TrainConfig, [str(path), str(later)], ["model.d_model=64", "stop.target_loss=3.2"])
    assert cfg.optim.lr == 3e-4 and cfg.model.d_model == 64 and cfg.stop.target_loss == 3.2
    assert cfg.model.n_layers == 2
    assert load_config(TrainConfig, [], ["replay.domains=[0,1]"]).replay.domains == [0, 1]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean optim.lr?)"),
    ("optim.lr=fast", "bad value for 'optim.lr'"),
    ("model.n_layers=2.5", "bad value for 'model.n_layers'"),
    ("nonsense", "expected key.sub=value"),
    ("optim=3", "optim"),
])
def test_bad_keys_and_values_are_one_line_errors(override, message):
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], [override])
    one_line_error(e, message)


@pytest.mark.parametrize("old, new", [
    ("init_from", "model.model_name_or_path"), ("model_name_or_path", "model.model_name_or_path"),
    ("torch_dtype", "model.dtype"), ("batch_size", "data.batch_size"),
    ("checkpoint_every_tokens", "checkpoint.every_tokens"), ("checkpoint_every_steps", "checkpoint.every_steps"),
    ("save.merge_lora", "checkpoint.merge_lora"), ("data.valid_rows", "data.valid_examples"),
    ("eval.max_rows", "eval.max_tokens"), ("lora.target_modules", "lora.targets"),
])
def test_moved_keys_name_their_new_place(tmp_path, old, new):
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], [f"{old}=1"])
    one_line_error(e, f"override '{old}=1'", f"'{old}' has moved to '{new}")
    path = tmp_path / "old.yaml"  # the same from a YAML file (nested)
    *parents, leaf = old.split(".")
    path.write_text("".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: 1\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    one_line_error(e, f"config file {path}", f"'{old}' has moved to '{new}")
    assert set(MOVED_KEYS) >= {old}


def test_moved_key_message_is_exact():
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], ["init_from=runs/pre"])
    assert str(e.value) == "override 'init_from=runs/pre': 'init_from' has moved to 'model.model_name_or_path'"


def test_bad_config_files(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(tmp_path / "missing.yaml")])
    one_line_error(e, "missing.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(bad)])
    one_line_error(e, "bad.yaml", "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(unknown)])
    one_line_error(e, "unknown.yaml", "unknown config key 'optim.learning_rate'")
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text("stop:\n  steps: many\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(mistyped)])
    one_line_error(e, "mistyped.yaml", "bad value for 'stop.steps'")


@pytest.mark.parametrize("text, kind", [("- optim.lr: 1\n- stop.steps: 3\n", "list"), ("just words\n", "scalar"),
                                        ("42\n", "scalar")])
def test_a_yaml_that_is_not_a_mapping_is_a_one_line_error(tmp_path, text, kind):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    one_line_error(e, "odd.yaml", "expected a mapping", kind)


def test_stop_criteria_validation(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(**{"stop.tokens": 100}))
    one_line_error(e, "conflicting length criteria stop.tokens, stop.steps", "=null")
    # a YAML (an experiment file, a saved config.yaml) sets one, an override another: say how to unset the YAML's
    path = tmp_path / "c.yaml"
    path.write_text("stop:\n  tokens: 100\n")
    cfg = load_config(TrainConfig, [str(path)], ["data.train=x", "run_dir=r", "stop.steps=10"])
    with pytest.raises(SelfReplayError) as e:
        _checked(cfg)
    one_line_error(e, "conflicting length criteria", "stop.tokens=null")
    cfg = load_config(TrainConfig, [str(path)], ["data.train=x", "run_dir=r", "stop.steps=10", "stop.tokens=null"])
    _checked(cfg)  # unset as told: valid
    cfg = _valid()
    cfg.stop.steps = None
    with pytest.raises(SelfReplayError) as e:
        _checked(cfg)
    one_line_error(e, "no stop criterion")
    cfg.stop.target_loss = 3.0
    _checked(cfg)  # a target alone is a valid criterion
    cfg.optim.schedule = "cosine"
    with pytest.raises(SelfReplayError) as e:
        _checked(cfg)
    one_line_error(e, "cosine needs a length")
    for key in ("stop.steps", "stop.max_time", "stop.early_stop_evals"):
        with pytest.raises(SelfReplayError) as e:
            _checked(_valid(**{"stop.steps": "null", key: 0}))
        one_line_error(e, key, "positive")


def test_replay_needs_finetuning_and_valid_choices():
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(**{"replay.method": "kl"}))
    one_line_error(e, "replay needs a teacher")
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(**{"replay.method": "magic", "model.model_name_or_path": "m"}), command=FINETUNE)
    one_line_error(e, "replay.method='magic'", "kl")
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(), command=FINETUNE)
    one_line_error(e, "model.model_name_or_path", "finetuning needs a model")
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(**{"model.model_name_or_path": "m"}), command=PRETRAIN)
    one_line_error(e, "model.model_name_or_path", "selfreplay finetune")
    finetune = {"model.model_name_or_path": "m"}
    _checked(_valid(**finetune), command=FINETUNE)  # the default (kl) is valid
    bad = [({"replay.divergence": "kl2"}, "gpt", "replay.divergence"),
           ({"replay.jsd_beta": 1.0}, "gpt", "replay.jsd_beta"),
           ({"replay.coeff": -1}, "gpt", "replay.coeff"),
           ({"replay.method": "replace", "replay.fraction": 0}, "gpt", "replay.fraction"),
           ({"replay.temperature": 0}, "gpt", "replay.temperature"),
           ({"replay.top_p": 1.5}, "gpt", "replay.top_p"),
           ({"replay.prompt": "chat"}, "gpt", "replay.prompt"),
           ({"replay.prompt": "system"}, "hf", "replay.prompt"),
           ({"replay.domains": "[1]"}, "hf", "replay.domains"),
           ({"lora.r": -1}, "gpt", "lora.r"),
           ({"lora.r": 4, "teacher.dtype": "bfloat16"}, "hf", "teacher.dtype"),
           ({"eval.mcq": "[q.jsonl]"}, "gpt", "eval.mcq"),
           ({"distributed.strategy": "zero3"}, "hf", "distributed.strategy"),
           ({"data.batch_size": 6, "gradient_accumulation_steps": 4}, "hf", "gradient_accumulation_steps"),
           ({"data.mix_fraction": 0.5}, "gpt", "data.mix"),
           ({"optim.name": "adam"}, "gpt", "optim.name")]
    for over, kind, word in bad:
        with pytest.raises(SelfReplayError) as e:
            _checked(_valid(**finetune, **over), kind, FINETUNE)
        one_line_error(e, word)
    with pytest.raises(SelfReplayError) as e:
        _checked(_valid(**{"lora.r": 4}), command=PRETRAIN)
    one_line_error(e, "lora.r", "finetun")


def test_describe_config_lists_every_key():
    text = describe_config(TrainConfig)
    for key in config_keys(TrainConfig):
        assert f"\n{key}=" in "\n" + text, key
    for line in ("model.d_model=256", "replay.coeff=None  # coefficient c: 10 (built-in GPT) / 1 (Hugging Face",
                 "stop.target_loss=None", "optim.schedule='constant'", "replay.method=None", "[replay]"):
        assert line in text, line


def test_describe_config_per_command():
    pretrain, finetune = describe_config(TrainConfig, PRETRAIN), describe_config(TrainConfig, FINETUNE)
    keys = config_keys(TrainConfig)
    finetune_only = {"model.model_name_or_path", "checkpoint.merge_lora", "eval.prev", "eval.mcq", "lora.r",
                     "replay.method", "replay.coeff", "teacher.dtype"}
    pretrain_only = {"model.d_model", "model.vocab_size", "model.context"}
    for key in keys:  # every key applies to at least one command
        assert f"\n{key}=" in "\n" + pretrain or f"\n{key}=" in "\n" + finetune, key
    assert not any(line.startswith(("replay.", "lora.", "teacher.")) for line in pretrain.splitlines())
    for key in finetune_only:
        assert f"{key}=" not in pretrain and f"{key}=" in finetune, key
    for key in pretrain_only:
        assert f"{key}=" in pretrain and f"{key}=" not in finetune, key
    for key in ("stop.steps", "optim.lr", "data.train", "checkpoint.every_tokens", "eval.every_tokens"):
        assert f"{key}=" in pretrain and f"{key}=" in finetune, key
    assert "[replay]" not in pretrain and "[lora]" not in pretrain


def _alias_bomb(levels: int = 6) -> str:
    """A few hundred bytes that expand to 10^levels values: each level lists the previous one ten times."""
    lines = ["bomb:", "  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("replay:\n  domains: [0]\n" + _alias_bomb().replace("bomb:", "eval:\n  mcq:").replace(
        "\n  - ", "\n    - "))
    assert path.stat().st_size < 400
    start = time.monotonic()
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    assert time.monotonic() - start < 1
    one_line_error(e, f"config file {path}", "expands to over 1,000,000 values", "alias")


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("replay:\n  domains: &d [0, *d]\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    one_line_error(e, "loop.yaml", "replay.domains", "alias to itself")


@pytest.mark.parametrize("text, key, line", [
    ("optim:\n  lr: 1.0e-3\n  beta1: 0.8\n  lr: 2.0e-3\n", "optim.lr", 4),
    ("optim:\n  lr: 1.0e-3\nstop:\n  steps: 3\noptim:\n  beta1: 0.8\n", "optim", 5),
    ("run_dir: a\nrun_dir: b\n", "run_dir", 2),
], ids=["nested", "section", "scalar"])
def test_a_duplicate_yaml_key_is_refused(tmp_path, text, key, line):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    assert str(e.value) == f"config file {path}: duplicate key '{key}' (line {line}); give each key once"


def test_an_oversized_config_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * 200_000 + "optim:\n  lr: 1.0e-3\n")
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [str(path)])
    one_line_error(e, "huge.yaml", "larger than 1 MiB")


def test_an_empty_override_of_a_required_key_is_one_clear_line():
    with pytest.raises(SelfReplayError) as e:
        load_config(TrainConfig, [], ["run_dir="])
    assert str(e.value) == "override 'run_dir=': run_dir needs a value (an empty one means null, which run_dir " \
                           "cannot be)"
    assert load_config(TrainConfig, [], ["optim.lr="]).optim.lr is None  # optional keys may be emptied
