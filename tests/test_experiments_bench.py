"""`selfreplay bench`: one real training step of each method (plain, KL on real replay, KL on self-generated
replay) and the replay sampler, timed and measured, for the built-in GPT and a Hugging Face model."""

import json

import pytest
import torch

from conftest import one_line_error
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.bench import format_bench, run_bench

TINY = ["model.d_model=32", "model.n_layers=1", "model.head_dim=16", "model.context=16", "model.vocab_size=64",
        "data.batch_size=4", "replay.batch_size=2", "replay.buffer=2", "device=cpu"]
HF_TINY = ["data.batch_size=4", "data.seq_len=32", "replay.batch_size=2", "replay.buffer=2", "device=cpu"]
MEMORY_METHODS = ("rss_peak", "rss_lifetime_peak")  # on a CPU: the resident set (reset when /proc allows)


def test_bench_times_every_method():
    results = run_bench(["plain", "kl_real", "kl_self", "sampling"], None, TINY, steps=2, warmup=1, isolate=False)
    assert [r["method"] for r in results] == ["plain", "kl_real", "kl_self", "sampling"]
    for r in results[:3]:
        assert r["kind"] == "gpt" and r["device"] == "cpu" and r["threads"] >= 1
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(4 * 16 / (r["ms_per_step"] / 1e3))
        assert (r["batch"], r["seq_len"]) == (4, 16) and r["model"] == "built-in GPT 32x1x16x16"
        assert r["peak_mib"] > 0 and r["memory_method"] in MEMORY_METHODS
    assert [r["replay_rows"] for r in results[:3]] == [0, 2, 2]
    assert results[0]["time_vs_plain"] == 1.0 and results[2]["time_vs_plain"] > 0
    assert results[0]["params"] == results[1]["params"] == 32 * 64 * 2 + 12 * 32 * 32  # untied embed / head
    assert results[3]["sampled_tokens_per_s"] > 0 and results[3]["sequences_per_refill"] == 2 * 2
    assert results[3]["length"] == 16
    for r in results[:3]:  # how near the limit: the step's FLOPs per second, against a matmul in the same process
        assert r["gflops"] == pytest.approx(r["step_gflop"] / (r["ms_per_step"] / 1e3))
        assert r["of_matmul"] == pytest.approx(r["gflops"] / r["matmul_gflops"]) and r["matmul_size"] == 256
    # kl_real: 2 replay rows beside 4 in the student's forward and backward (x 6/4), and the teacher's forward of
    # them (a third of a forward and backward over 2 rows: + 1/6 of plain)
    assert results[1]["step_gflop"] / results[0]["step_gflop"] == pytest.approx(1.5 + 1 / 6, rel=0.01)
    table = format_bench(results)
    assert "kl_self" in table and "sampled tokens/s" in table and "built-in GPT" in table
    assert "% matmul" in table and "fp32 256^2 matmul" in table
    # the ratio: self-generated against real replay, each the step time of its own run
    assert results[2]["time_vs_kl_real"] == pytest.approx(results[2]["ms_per_step"] / results[1]["ms_per_step"])
    assert f"kl_self / kl_real: {results[2]['time_vs_kl_real']:.2f}\n" in table and "rounds" not in table


def test_self_generated_replay_is_timed_over_whole_refills():
    # buffer 2, one replay batch per step: a refill every 2 steps. 3 steps would time 1 or 2 refills for 3 steps
    # (a third too little or too much sampling); the window is rounded up to 4 steps with exactly 2 refills
    result, = run_bench(["kl_self"], None, TINY, steps=3, warmup=1, isolate=False)
    assert (result["timed_steps"], result["refills"], result["buffer"]) == (4, 2, 2)
    assert "timed over 4 steps with 2 refill(s)" in format_bench([result])


def test_rounds_interleave_the_methods_in_alternating_order_and_report_every_round(monkeypatch):
    import selfreplay.experiments.bench as bench

    order, real_bench = [], bench.bench_method
    monkeypatch.setattr(bench, "bench_method", lambda method, *a: order.append(method) or real_bench(method, *a))
    methods = ["plain", "kl_real", "kl_self", "sampling"]
    results = run_bench(methods, None, TINY, steps=1, warmup=1, isolate=False, rounds=3)
    assert order == methods + methods[::-1] + methods  # drift over the rounds lands on every method alike
    plain, kl_real, kl_self, sampling = results
    for r in (plain, kl_real, kl_self):  # each result is its middle round, every round kept in run order
        assert len(r["rounds_ms_per_step"]) == 3 and r["ms_per_step"] == sorted(r["rounds_ms_per_step"])[1]
    speeds = sampling["rounds_sampled_tokens_per_s"]
    assert len(speeds) == 3 and sampling["sampled_tokens_per_s"] == sorted(speeds)[1]
    # ratios are taken between runs of the same round, then their median
    same_round = [s / k for s, k in zip(kl_self["rounds_ms_per_step"], kl_real["rounds_ms_per_step"])]
    assert kl_self["rounds_time_vs_kl_real"] == pytest.approx(same_round)
    assert kl_self["time_vs_kl_real"] == pytest.approx(sorted(same_round)[1])
    assert kl_real["time_vs_plain"] == pytest.approx(
        sorted(k / p for k, p in zip(kl_real["rounds_ms_per_step"], plain["rounds_ms_per_step"]))[1])
    assert plain["time_vs_plain"] == 1.0 and "time_vs_kl_real" not in kl_real
    table = format_bench(results)
    assert "median of 3 rounds" in table and "kl_self / kl_real: " in table and " by round (median " in table
    with pytest.raises(SelfReplayError) as e:
        run_bench(["plain"], None, TINY, rounds=0, isolate=False)
    one_line_error(e, "--rounds=0")


def _math_attention_flops(fn) -> int:
    """FLOPs torch's counter sees in ``fn()``, attention run by the math kernel (its matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape", [dict(d_model=32, n_layers=2, head_dim=16, context=16, vocab_size=64),
                                   dict(d_model=32, n_layers=1, head_dim=16, context=128, vocab_size=512)])
def test_the_flop_formula_is_what_torch_counts_in_a_forward_and_backward(shape):
    import torch

    from selfreplay.experiments.bench import gpt_forward_flops
    from selfreplay.models.gpt import GPT, GPTConfig

    config = GPTConfig(**shape)
    net = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (3, config.context))
    logits = []
    forward = _math_attention_flops(lambda: logits.append(net(tokens)))
    backward = _math_attention_flops(lambda: logits[0].sum().backward())
    assert forward == pytest.approx(gpt_forward_flops(config, 3, config.context), rel=0.02)
    assert backward == pytest.approx(2 * forward, rel=0.02)


def test_the_step_flops_are_what_torch_counts_in_a_kl_replay_step(tmp_path, pretrained, corpora):
    """A real training step, KL on 8 stored replay rows beside 16 data rows (the teacher runs over the replay)."""
    from conftest import tiny_overrides
    from selfreplay.config import FINETUNE, TrainConfig, load_config
    from selfreplay.experiments.bench import gpt_step_flops
    from selfreplay.models.gpt import GPTConfig
    from selfreplay.train import prepare
    from selfreplay.train.build import build_parts
    from selfreplay.train.loop import Trainer

    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "ft", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.method": "kl", "stop.steps": 2}))
    cfg, kind, info = prepare(cfg, FINETUNE)
    trainer = Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device)
    counted = _math_attention_flops(trainer.train_step)
    assert counted == pytest.approx(gpt_step_flops(GPTConfig.of(cfg.model), 16, 16, 8, teacher_rows=8), rel=0.03)


def test_cli_bench_of_a_hugging_face_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    from selfreplay.cli import main

    out = tmp_path / "bench.json"
    main(["bench", "--model", "llama-tiny", "--methods", "plain,kl_real,kl_self", "--steps", "1", "--warmup", "0",
          "--no-isolate", "--json", str(out), *HF_TINY, "replay.temperature=0.5"])
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["plain", "kl_real", "kl_self"]
    assert [r["replay_rows"] for r in results] == [0, 2, 2]
    for r in results:
        assert r["kind"] == "hf" and r["model"] == "llama-tiny" and (r["batch"], r["seq_len"]) == (4, 32)
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(4 * 32 / (r["ms_per_step"] / 1e3))
        assert r["peak_mib"] > 0 and r["memory_method"] in MEMORY_METHODS
        assert r["params"] == results[0]["params"]
    assert results[0]["time_vs_plain"] == 1.0
    table = capsys.readouterr().out
    assert "kl_self" in table and "llama-tiny" in table and "batch 4 x 32 tokens" in table
    # what was measured, where: the CPU by its name and the SIMD level its kernels use
    assert f" ({results[0]['processor']}), {results[0]['threads']} thread" in table
    assert results[0]["processor"].endswith(torch.backends.cpu.get_cpu_capability())


def test_lora_run_and_bad_input():
    pytest.importorskip("peft")
    results = run_bench(["kl_self"], "llama-tiny", HF_TINY + ["lora.r=2"], steps=1, warmup=0, isolate=False)
    assert results[0]["method"] == "kl_self" and results[0]["ms_per_step"] > 0
    assert "time_vs_plain" not in results[0]  # no plain run to compare with
    assert "kl_self" in format_bench(results)
    with pytest.raises(SelfReplayError) as e:
        run_bench(["kl_fast"], isolate=False)
    one_line_error(e, "--methods", "kl_fast")
    with pytest.raises(SelfReplayError) as e:
        run_bench([], isolate=False)
    one_line_error(e, "--methods", "none given")
    with pytest.raises(SelfReplayError) as e:
        run_bench(["plain"], steps=0, isolate=False)
    one_line_error(e, "steps=0")
    with pytest.raises(SelfReplayError) as e:  # a bad override is the finetuning config's one-line error
        run_bench(["plain"], None, TINY + ["optim.lrr=1"], steps=1, warmup=0, isolate=False)
    one_line_error(e, "optim.lrr")


def test_isolated_run_reports_its_own_peak_and_errors():
    """isolate=True (the CLI default): each method in a fresh process; a failure there is a one-line error here."""
    (result,) = run_bench(["kl_real"], None, TINY, steps=1, warmup=0, isolate=True)
    assert result["method"] == "kl_real" and result["ms_per_step"] > 0 and result["peak_mib"] > 0
    assert result["replay_rows"] == 2 and result["memory_method"] in MEMORY_METHODS
    with pytest.raises(SelfReplayError) as e:
        run_bench(["plain"], None, TINY + ["model.head_dim=5"], steps=1, warmup=0, isolate=True)
    one_line_error(e, "bench plain", "head_dim")
