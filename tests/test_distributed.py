"""Multi-process finetuning: 2 gloo processes under torchrun match one process with the same global batch."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import one_line_error
from selfreplay import distributed as dist_utils
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from test_hf_trainer import tiny_args  # noqa: E402


def torchrun(args: list[str], nproc: int = 2, timeout: int = 180) -> str:
    """``python -m torch.distributed.run --nproc_per_node N -m selfreplay finetune ARGS`` on CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "selfreplay", "finetune", *args]  # --standalone: a free local rendezvous port
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return out


def one_process(args: list[str]) -> None:
    from selfreplay.config import load_config
    from selfreplay.hf_trainer import HFTrainConfig, train_hf

    train_hf(load_config(HFTrainConfig, [], args))


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict], tol: float = 1e-4) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_ntp", "valid_loss", "valid_kl"):
            if key in ra or key in rb:
                assert ra[key] == pytest.approx(rb[key], abs=tol), (key, ra["step"])


def run_args(hf_files, run_dir, **extra) -> list[str]:
    return tiny_args(hf_files["llama"], hf_files["chat"], run_dir, torch_dtype="float32", **{
        "stop.steps": 4, "eval.every_steps": 2, **extra})


def test_ddp_two_processes_match_one(hf_files, tmp_path):
    """Full finetuning, no replay: the same global batch gives the same losses and weights on 1 or 2 ranks."""
    from transformers import AutoModelForCausalLM

    extra = {"replay.method": "none", "gradient_accumulation_steps": 2}
    one_process(run_args(hf_files, tmp_path / "one", **extra))
    torchrun(run_args(hf_files, tmp_path / "two", **extra))
    assert_same_run(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2


@pytest.mark.slow
def test_fsdp2_lora_with_self_replay_runs_on_two_gloo_processes(hf_files, tmp_path):
    """FSDP2 (fully_shard) on CPU/gloo: LoRA + KL self-replay trains, each rank sampling its own replay, and the
    gathered, merged model loads with plain transformers; without replay it matches one process."""
    from transformers import AutoModelForCausalLM

    lora = {"lora.r": 4, "lora.alpha": 16, "optim.lr": 2e-2, "distributed.strategy": "fsdp",
            "loss_chunk_size": 16}  # ranks then run different numbers of loss chunks: must not deadlock
    one_process(run_args(hf_files, tmp_path / "one", **lora, **{"replay.method": "none"}))
    torchrun(run_args(hf_files, tmp_path / "two", **lora, **{"replay.method": "none"}))
    assert_same_run(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    torchrun(run_args(hf_files, tmp_path / "kl", **lora, **{"replay.max_logprobs_gib": 0}))  # teacher recomputed
    records = metrics(tmp_path / "kl")
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] and records[-1]["valid_kl"] > 0
    assert records[-1]["train_replay"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "kl" / "model")


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = dist_utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled) == (0, 1, False)
    assert dist_utils.is_main() and dist_utils.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist_utils.reduce_mean(t), t) and torch.equal(dist_utils.reduce_sum(t), t)
    model = torch.nn.Linear(2, 2)
    assert dist_utils.wrap_model(model, "fsdp") is model
    state = dist_utils.gather_full_state_dict(model)
    assert set(state) == {"weight", "bias"}
    dist_utils.barrier()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SelfReplayError) as e:
        dist_utils.env_world()
    one_line_error(e, "WORLD_SIZE")
