from selfreplay.bench import format_bench, run_bench

TINY = ["model.d_model=32", "model.n_layers=1", "model.head_dim=16", "model.context=16", "model.vocab_size=64",
        "data.batch_size=8", "replay.batch_size=4", "replay.buffer=2"]


def test_bench_times_every_method():
    results = run_bench(["plain", "kl_real", "kl_self", "sampling"], TINY, steps=2, warmup=1)
    assert [r["method"] for r in results] == ["plain", "kl_real", "kl_self", "sampling"]
    assert all(r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 for r in results[:3])
    assert results[3]["sampled_tokens_per_s"] > 0
    assert results[0]["relative_to_plain"] == 1.0
    assert "kl_self" in format_bench(results)
