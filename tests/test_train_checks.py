"""Every value checked before anything is allocated or trained: NaN / infinity in every float key, ranges, and
memory estimates that refuse absurd sizes (selfreplay.train.checks, selfreplay.train.memory)."""

import glob
import math
import time

import pytest
import torch

from conftest import make_corpus, one_line_error, run_cli
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, config_keys, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.train.checks import resolve_defaults, validate

FLOAT_KEYS = [k for k, f in config_keys(TrainConfig).items() if "float" in str(f.type)]
TINY = ["model.d_model=32", "model.n_layers=1", "model.head_dim=16", "model.context=16", "model.vocab_size=64",
        "data.batch_size=8", "data.valid_tokens=300", "optim.warmup_tokens=0", "log.progress=false",
        "replay.batch_size=4", "stop.steps=1"]


def _checked(*overrides: str) -> TrainConfig:
    """The checks a finetuning run of the built-in GPT makes before building anything."""
    base = ["data.train=x", "run_dir=r", "stop.steps=10", "model.model_name_or_path=m"]
    cfg = resolve_defaults(load_config(TrainConfig, [], base + list(overrides)), "gpt", FINETUNE)
    validate(cfg, "gpt", FINETUNE)
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A one-step tiny pretraining run and a corpus to finetune on."""
    root = tmp_path_factory.mktemp("checks")
    en, es = make_corpus(root / "en", seed=1, domain=0, n=4000), make_corpus(root / "es", seed=2, domain=1, n=4000)
    from selfreplay.cli import main

    main(["pretrain", f"run_dir={root / 'pre'}", f"data.train={en}", *TINY])
    return root, es


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_nan_and_infinity(key, value):
    assert len(FLOAT_KEYS) >= 20 and {"optim.lr", "stop.epochs", "replay.coeff", "replay.target_kl_gain"} <= set(
        FLOAT_KEYS)
    cfg = load_config(TrainConfig, [], [f"{key}={value}"])
    loaded = cfg
    for part in key.split("."):
        loaded = getattr(loaded, part)
    assert isinstance(loaded, float) and not math.isfinite(loaded)  # the value really arrives
    with pytest.raises(SelfReplayError) as e:
        _checked(f"{key}={value}")
    one_line_error(e, f"{key}={float(value)}", "finite")


@pytest.mark.parametrize("command, override, message", [
    ("pretrain", "optim.lr=nan", "optim.lr=nan"), ("pretrain", "stop.epochs=inf", "stop.epochs=inf"),
    ("finetune", "replay.coeff=-inf", "replay.coeff=-inf"),
    ("finetune", "replay.target_kl=inf", "replay.target_kl=inf"),
])
def test_non_finite_values_through_the_cli(teacher, tmp_path, capsys, command, override, message):
    root, es = teacher
    model = [f"model.model_name_or_path={root / 'pre'}"] if command == "finetune" else []
    code, _, err = run_cli([command, f"run_dir={tmp_path / 'run'}", f"data.train={es}", *TINY, *model, override],
                           capsys)
    assert code == 2 and err == f"error: {message}: expected a finite number\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, words", [
    ("stop.target_loss=0", ["stop.target_loss=0.0", "positive"]),
    ("stop.target_loss=-1", ["stop.target_loss=-1.0", "positive"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay=-0.1", ">= 0"]),
    ("optim.momentum=-1", ["optim.momentum=-1.0", ">= 0"]),
    ("log.progress_every_s=-1", ["log.progress_every_s=-1.0", ">= 0"]),
    ("lora.alpha=0", ["lora.alpha=0.0", "positive"]),
    ("replay.decode=fast", ["replay.decode='fast'", "auto, eager, static, compiled"]),
])
def test_ranges_name_the_key(override, words):
    with pytest.raises(SelfReplayError) as e:
        _checked(override, "lora.r=4")
    one_line_error(e, *words)


def test_replay_decode_beyond_eager_is_a_builtin_gpt_option():
    base = ["data.train=x", "run_dir=r", "stop.steps=10", "model.model_name_or_path=m"]
    for mode in ("static", "compiled"):
        assert _checked(f"replay.decode={mode}").replay.decode == mode
        cfg = resolve_defaults(load_config(TrainConfig, [], base + [f"replay.decode={mode}"]), "hf", FINETUNE)
        with pytest.raises(SelfReplayError) as e:
            validate(cfg, "hf", FINETUNE)
        one_line_error(e, f"replay.decode={mode}", "Hugging Face", "eager")


@pytest.mark.parametrize("name, value", [("target", math.inf), ("start", math.nan), ("step", math.inf),
                                         ("gain", math.inf), ("coeff_max", math.inf), ("coeff_min", math.nan)])
def test_a_budget_refuses_non_finite_settings(name, value):
    from selfreplay.replay.budget import ForgettingBudget

    args = {"target": 0.1, "start": 1.0, "step": 0.2, "smoothing": 0.9, "coeff_min": 1e-3, "coeff_max": 1e4,
            "gain": 0.0, name: value}
    with pytest.raises(SelfReplayError) as e:
        ForgettingBudget(**args)
    one_line_error(e, "finite")


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["replay_coeff", "replay_temperature", "replay_target_kl", "replay_target_kl_step",
                                  "replay_target_kl_gain", "replay_coeff_max"])
def test_trl_replay_settings_refuse_non_finite_values(name, value):
    from selfreplay.integrations.trl import ReplaySettings

    with pytest.raises(SelfReplayError) as e:
        ReplaySettings(**{name: value}).check()
    one_line_error(e, f"{name}={value}", "finite")


@pytest.mark.parametrize("temperature", [math.nan, math.inf])
def test_sampling_settings_refuse_non_finite_values(temperature):
    from selfreplay.replay.sampling import check_sampling_args

    with pytest.raises(SelfReplayError) as e:
        check_sampling_args(temperature, None, None)
    one_line_error(e, f"temperature={temperature}", "finite")


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")])
def test_generate_refuses_non_finite_options_before_writing(teacher, tmp_path, capsys, option, value):
    root, _ = teacher
    code, _, err = run_cli(["generate", str(root / "pre"), "--out", str(tmp_path / "g"), "--num-sequences", "4",
                            option, value], capsys)
    assert code == 2 and f"'{value}' is not a finite number" in err and option in err
    assert list(tmp_path.iterdir()) == []  # no corpus, no .partial


# ------------------------------------------------------------------------------------------------ sizes

@pytest.mark.parametrize("override, key", [
    ("model.d_model=1048576", "model.d_model=1048576"),
    ("model.context=1000000000", "model.context=1000000000"),
    ("model.vocab_size=1000000000", "model.vocab_size=1000000000"),
])
def test_absurd_model_sizes_are_refused_before_allocating(tmp_path, capsys, override, key):
    corpus = make_corpus(tmp_path / "c", seed=1, domain=0, n=2000)
    start = time.monotonic()
    code, _, err = run_cli(["pretrain", f"run_dir={tmp_path / 'run'}", f"data.train={corpus}", *TINY, override],
                           capsys)
    assert time.monotonic() - start < 5
    assert code == 2 and err.startswith(f"error: {key}: the run needs ~") and err.count("\n") == 1
    assert "TB" in err or "PB" in err  # the estimate, in a unit a reader can compare with the machine's memory
    assert "this machine has" in err and not (tmp_path / "run").exists()


def test_too_many_layers_are_refused(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "c", seed=1, domain=0, n=2000)
    code, _, err = run_cli(["pretrain", f"run_dir={tmp_path / 'run'}", f"data.train={corpus}", *TINY,
                            "model.n_layers=1000000"], capsys)
    assert code == 2 and "model.n_layers=1000000: at most 1024" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, key", [
    (["replay.source=self", "replay.buffer=1000000000"], "replay.buffer=1000000000"),
    (["replay.method=ewc", "replay.source=self", "replay.ewc_sequences=1000000000"], "replay.ewc_sequences=1000000000"),
])
def test_absurd_replay_sizes_are_refused_before_allocating(teacher, tmp_path, capsys, overrides, key):
    root, es = teacher
    code, _, err = run_cli(["finetune", f"run_dir={tmp_path / 'ft'}", f"data.train={es}", *TINY,
                            f"model.model_name_or_path={root / 'pre'}", *overrides], capsys)
    assert code == 2 and err.startswith(f"error: {key}: the run needs ~")
    assert "one refill of self-generated replay" in err and not (tmp_path / "ft").exists()


def test_an_explicit_limit_replaces_the_machines_memory(teacher, tmp_path, capsys, monkeypatch):
    root, es = teacher
    argv = ["finetune", f"run_dir={tmp_path / 'ft'}", f"data.train={es}", *TINY,
            f"model.model_name_or_path={root / 'pre'}", "replay.source=self", "replay.buffer=100000"]
    monkeypatch.setenv("SELFREPLAY_MAX_MEMORY_GB", "0.5")  # the buffer: 100k x 4 rows x 16 tokens, ~5 GB
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "replay.buffer=100000" in err and "SELFREPLAY_MAX_MEMORY_GB allows 500 MB" in err
    monkeypatch.setenv("SELFREPLAY_MAX_MEMORY_GB", "lots")
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "SELFREPLAY_MAX_MEMORY_GB='lots': expected a positive number" in err


def test_eval_self_refuses_more_sequences_than_fit(teacher, capsys):
    root, _ = teacher
    run = str(root / "pre")
    code, _, err = run_cli(["eval", run, "--teacher", run, "--self", "1000000000"], capsys)
    assert code == 2 and err.startswith("error: eval --self=1000000000: sampling needs ~")


def test_tokenizer_vocabulary_has_an_upper_bound(tmp_path, capsys):
    from selfreplay.data.tokenizer import MAX_VOCAB

    text = tmp_path / "t.txt"
    text.write_text("a few words of text\n" * 20)
    code, _, err = run_cli(["tokenizer", "train", str(text), "--out", str(tmp_path / "tok.json"), "--vocab-size",
                            str(MAX_VOCAB + 1)], capsys)
    assert code == 2 and f"vocab_size={MAX_VOCAB + 1}: at most 1,048,576" in err
    assert not (tmp_path / "tok.json").exists()


def test_the_projects_presets_fit():
    """Every experiment's cpu preset fits a laptop (8 GB), its paper preset one 80 GB GPU (the last run of each
    stage, the largest of model_size's grid; finetunes estimated with self-generated replay, the larger source)."""
    from selfreplay.experiments.sweep import expand_jobs, job_config, load_experiment
    from selfreplay.models.gpt import GPTConfig
    from selfreplay.train.memory import estimate, gpt_shape

    checked = 0
    for path in sorted(p for p in glob.glob("experiments/*.yaml") if "instruct" not in p):
        for scale, device, limit in (("cpu", "cpu", 8e9), ("paper", "cuda", 80e9)):
            jobs = expand_jobs(load_experiment(path, scale, "unused"))
            by_key = {j.key: j for j in jobs}
            for stage in dict.fromkeys(j.stage for j in jobs):
                job = [j for j in jobs if j.stage == stage][-1]
                if job.kind == FINETUNE and not job.upstream:
                    continue  # a model given by path: its shape is not in the file
                cfg = job_config(job)
                shape = (cfg if job.kind == PRETRAIN else job_config(by_key[job.upstream])).model
                resolve_defaults(cfg, "gpt", job.kind)
                cfg.replay.source = "self" if cfg.replay.source == "auto" else cfg.replay.source
                parts = estimate(cfg, "gpt", job.kind, gpt_shape(GPTConfig.of(shape), []), torch.device(device))
                assert sum(p.bytes for p in parts) < limit, (path, scale, job.key)
                checked += 1
    assert checked > 25


def test_the_instruct_preset_fits_one_80gb_gpu(tmp_path):
    """experiments/instruct_verilog.yaml with Llama-3.2-1B's shape (its config, no weights): ~45 GB, of which the
    model and its AdamW state ~20 GB."""
    from transformers import LlamaConfig

    from selfreplay.train.memory import estimate, hf_shape

    LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                torch_dtype="bfloat16").save_pretrained(tmp_path)
    cfg = load_config(TrainConfig, ["experiments/instruct_verilog.yaml"], [f"model.model_name_or_path={tmp_path}"])
    resolve_defaults(cfg, "hf", FINETUNE)
    shape = hf_shape(cfg)
    assert shape.params == 1_235_814_400 and shape.weight_bytes == 4  # model.dtype=float32 wins over the config's
    parts = estimate(cfg, "hf", FINETUNE, shape, torch.device("cuda"))
    assert parts[0].bytes == 1_235_814_400 * 16
    assert 30e9 < sum(p.bytes for p in parts) < 80e9
