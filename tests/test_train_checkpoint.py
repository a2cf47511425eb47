"""The checkpoint's state file: every kind of value comes back exactly, a pickle is never loaded, a full disk is
one line and leaves no half-written checkpoint."""

import math
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_overrides
from selfreplay.errors import SelfReplayError
from selfreplay.train import checkpoint as ckpt


def _same(a, b) -> None:
    """Equal, type for type, tensors bit for bit (NaN included)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a.reshape(-1).view(torch.uint8),
                           b.view(torch.uint8) if b.dtype == torch.bool else b.reshape(-1).view(torch.uint8))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_every_kind_of_value_comes_back_exactly(tmp_path):
    weight = torch.randn(4, 6)
    state = {
        "model": {"w": weight, "w_t": weight.t(), "same_storage": weight[1], "bf16": torch.randn(3).bfloat16(),
                  "scalar": torch.tensor(7.5), "empty": torch.zeros(0, 3), "flags": torch.tensor([True, False])},
        "rng": torch.get_rng_state(),
        "counters": {"step": 12, "best_valid": math.inf, "low": -math.inf, "odd": math.nan, "reason": None,
                     "flag": True, "sums": {"loss": 1.25}},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]},
        "$looks_like_a_tag": {"$tensor": "not a reference"},
        "blob": b"\x00\xffbytes", "array": np.arange(5, dtype=np.uint16), "np_int": np.int64(3),
    }
    ckpt.write_state(state, tmp_path)
    back = ckpt.read_state(tmp_path)
    expected = {**state, "np_int": 3}
    _same(expected, back)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.STATE, ckpt.TENSORS]


class _Planted:
    """What an attacker puts in a checkpoint: unpickling it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _interrupted_run(corpora, pretrained, run_dir) -> list[str]:
    from selfreplay.config import FINETUNE, TrainConfig, load_config
    from selfreplay.train import train

    args = tiny_overrides(run_dir, corpora["es"], **{"model.model_name_or_path": pretrained, "stop.steps": 8,
                                                     "checkpoint.every_steps": 4})

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], args), FINETUNE, on_step=interrupt)
    return args


@pytest.mark.parametrize("where", ["legacy state.pt", "in place of the state files"])
def test_a_planted_pickle_is_refused_and_never_run(corpora, pretrained, tmp_path, capsys, where):
    run_dir = tmp_path / "run"
    _interrupted_run(corpora, pretrained, run_dir)
    step = ckpt.latest_checkpoint(run_dir)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    payload = pickle.dumps({"counters": {"step": 4}, "x": _Planted(marker)})
    if where == "legacy state.pt":  # a checkpoint directory as earlier versions wrote it
        for name in ("state.json", "state.safetensors"):
            (step / name).unlink(missing_ok=True)
        (step / "state.pt").write_bytes(payload)
    else:
        (step / "state.json").write_bytes(payload)
        (step / "state.safetensors").write_bytes(payload)
    code, _, err = run_cli(["finetune", "--resume", f"run_dir={run_dir}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("pickle" in err) if where == "legacy state.pt" else ("corrupt training state" in err), err
    assert not marker.exists()  # nothing in the file ran


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(full_disk):
    ckpt.save_checkpoint(full_disk, 1, lambda d: ckpt.write_state({"counters": {"step": 1}}, d))
    too_big = {"counters": {"step": 2}, "model": {"w": torch.zeros(1_000_000)}}  # 4 MB on a 64 KiB disk
    with pytest.raises(SelfReplayError) as e:
        ckpt.save_checkpoint(full_disk, 2, lambda d: ckpt.write_state(too_big, d))
    msg = str(e.value)
    assert "\n" not in msg and "no space left" in msg and "step_00000002" in msg, msg
    assert sorted(p.name for p in (full_disk / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert ckpt.load_checkpoint_state(full_disk)["counters"]["step"] == 1
