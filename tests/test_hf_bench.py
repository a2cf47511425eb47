"""`selfreplay bench-hf`: one real step of each kind on a tiny random Llama, timed and measured."""

import json

import pytest

from conftest import one_line_error
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")

from selfreplay.hf_bench import format_hf_bench, run_hf_bench  # noqa: E402

TINY = ["--batch-size", "4", "--seq-len", "32", "--replay-rows", "2", "--chunk-size", "16", "--steps", "1",
        "--warmup", "0", "--device", "cpu"]


def test_cli_times_every_step_kind(tmp_path, capsys):
    from selfreplay.cli import main

    out = tmp_path / "bench.json"
    main(["bench-hf", "llama-tiny", *TINY, "--no-isolate", "--json", str(out), "replay.temperature=0.5"])
    results = json.loads(out.read_text())
    assert [r["kind"] for r in results] == ["plain", "kl_real", "kl_self"]
    assert [r["replay_rows"] for r in results] == [0, 2, 2]
    for r in results:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(4 * 32 / (r["ms_per_step"] / 1e3))
        assert r["peak_mib"] > 0 and r["step_mib"] is not None and r["loss_chunk_size"] == 16
        assert r["trainable_params"] == r["params"]  # full finetuning
    assert results[0]["time_vs_plain"] == 1.0
    table = capsys.readouterr().out
    assert "kl_self" in table and "full finetuning" in table


def test_lora_run_and_bad_input():
    # isolate=True (a spawned process per kind, the CLI default) is left to manual runs: it costs ~15 s here
    results = run_hf_bench("llama-tiny", ["kl_self"], batch_size=4, seq_len=32, replay_rows=2, lora_r=2, steps=1,
                           warmup=0, device="cpu", isolate=False)
    assert results[0]["kind"] == "kl_self" and results[0]["trainable_params"] < results[0]["params"] / 2
    assert results[0]["memory_method"] == "rss_peak" and results[0]["time_vs_plain"] is None
    assert "LoRA r=2" in format_hf_bench(results)
    with pytest.raises(SelfReplayError) as e:
        run_hf_bench("llama-tiny", ["kl_fast"], isolate=False)
    one_line_error(e, "--kinds", "kl_fast")
    with pytest.raises(SelfReplayError) as e:
        run_hf_bench("llama-tiny", steps=0, isolate=False)
    one_line_error(e, "steps=0")
