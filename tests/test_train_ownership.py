"""A run never deletes or overwrites what it did not create: the run directory's marker, refused directories,
checkpoints deleted only by their own names and never through a symbolic link."""

import os
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli, tiny_overrides
from selfreplay.config import PRETRAIN, TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.train import checkpoint as ckpt
from selfreplay.train import train

MARKER = ".selfreplay-run"


def _args(run_dir, corpora, **extra) -> list[str]:
    return tiny_overrides(run_dir, corpora["en"], **{"stop.steps": 6, "checkpoint.every_steps": 2, **extra})


def _interrupted(run_dir, corpora) -> None:
    """A run killed at step 5: its checkpoints/ holds step_00000004 (and latest)."""
    def interrupt(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], _args(run_dir, corpora)), PRETRAIN, on_step=interrupt)
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000004"


def _tree(root: Path) -> dict:
    """Every file under ``root`` (links not followed) and its content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes() if not p.is_symlink() else os.readlink(p)
    return out


def test_a_non_empty_directory_that_is_not_a_run_is_refused_and_untouched(corpora, tmp_path, capsys):
    run_dir = tmp_path / "mine"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "important.txt").write_text("keep")
    (run_dir / "config.yaml").write_text("my: own config\n")
    (run_dir / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = _tree(run_dir)
    code, out, err = run_cli(["pretrain", *_args(run_dir, corpora)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"run_dir {run_dir}: not empty and not a selfreplay run directory" in err and "new or empty" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]  # no .lock
    assert _tree(run_dir) == before


def test_a_run_then_resume_removes_only_its_own_checkpoints(corpora, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _interrupted(run_dir, corpora)
    assert (run_dir / MARKER).is_file()  # written with the run's first files
    code, out, err = run_cli(["pretrain", "--resume", f"run_dir={run_dir}"], capsys)
    assert code == 0 and "steps=6" in out, err
    assert not (run_dir / "checkpoints").exists()  # only ours was in it: gone
    assert (run_dir / "summary.json").is_file() and (run_dir / MARKER).is_file()
    code, _, err = run_cli(["pretrain", *_args(run_dir, corpora)], capsys)  # a finished run of ours: refused
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1


def test_a_finished_run_leaves_what_the_user_put_in_its_checkpoints_dir(corpora, tmp_path, capsys):
    other = tmp_path / "with_mine"
    _interrupted(other, corpora)
    (other / "checkpoints" / "important.txt").write_text("keep")
    (other / "checkpoints" / ".notes.tmp").write_text("keep too")  # not one of our temporary names
    code, _, err = run_cli(["pretrain", "--resume", f"run_dir={other}"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == [".notes.tmp", "important.txt"]
    assert (other / "checkpoints" / "important.txt").read_text() == "keep"


def test_a_symlinked_checkpoints_dir_is_refused_and_its_target_untouched(corpora, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _interrupted(run_dir, corpora)
    target = tmp_path / "elsewhere"
    (run_dir / "checkpoints").rename(target)
    (target / "step_00000002").mkdir()  # an older step a pruning save would delete
    (target / "step_00000002" / "mine.txt").write_text("keep")
    (target / "notes.txt").write_text("keep")
    (run_dir / "checkpoints").symlink_to(target, target_is_directory=True)
    before = _tree(target)
    for argv in (["pretrain", "--resume", f"run_dir={run_dir}"], ["pretrain", *_args(run_dir, corpora)]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert "checkpoints/ is a symbolic link" in err
    assert _tree(target) == before and (run_dir / "checkpoints").is_symlink()
    assert not (run_dir / "summary.json").exists()
    with pytest.raises(SelfReplayError) as e:  # the library refuses to write or delete through it too
        ckpt.save_checkpoint(run_dir, 8, lambda d: (d / ckpt.STATE).write_text("x"))
    one_line_error(e, "symbolic link")
    ckpt.remove_checkpoints(run_dir)
    assert _tree(target) == before


@pytest.mark.parametrize("where", ["/", "~/", "home", "."])  # a bare ~ is YAML null
def test_root_home_and_the_working_directory_are_never_a_run_dir(where, corpora, tmp_path, capsys, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    import selfreplay.train.build as build

    def no_parts(*args, **kwargs):  # the refusal must come first; nothing may be built, let alone written
        raise SelfReplayError("parts were built")

    monkeypatch.setattr(build, "build_parts", no_parts)
    run_dir = str(home) if where == "home" else where
    code, _, err = run_cli(["pretrain", *_args(run_dir, corpora)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "never an output directory" in err and f"run_dir {Path(run_dir)}:" in err
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    from selfreplay.train.ownership import claim_run_dir

    with pytest.raises(SelfReplayError) as e:
        claim_run_dir(run_dir)
    one_line_error(e, "never an output directory")


def test_an_earlier_versions_run_directory_is_recognised(corpora, tmp_path, capsys):
    """Before markers: an interrupted run (a checkpoint) resumes and is marked; a finished one is refused as one."""
    run_dir = tmp_path / "old"
    _interrupted(run_dir, corpora)
    (run_dir / MARKER).unlink()
    code, out, err = run_cli(["pretrain", "--resume", f"run_dir={run_dir}"], capsys)
    assert code == 0 and "steps=6" in out, err
    assert (run_dir / MARKER).is_file() and not (run_dir / "checkpoints").exists()
    (run_dir / MARKER).unlink()
    code, _, err = run_cli(["pretrain", *_args(run_dir, corpora)], capsys)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1


def test_temporaries_and_replaced_directories_are_only_ours_and_never_links(tmp_path):
    from selfreplay.train.files import atomic_dir, remove_stale_temporaries

    d = tmp_path / "d"
    d.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (d / ".step_00000004.ab_12xyz.tmp").mkdir()  # what a killed atomic_dir leaves
    (d / ".latest.0123abcd.tmp").write_text("x")  # what a killed atomic_file leaves
    (d / ".notes.tmp").write_text("mine")
    (d / ".other.abcdefgh.tmp").write_text("mine")  # our pattern, but not a name the caller writes
    (d / ".link.abcdefgh.tmp").symlink_to(target, target_is_directory=True)
    remove_stale_temporaries(d, lambda name: name in ("latest", "step_00000004", "link"))
    assert sorted(p.name for p in d.iterdir()) == [".link.abcdefgh.tmp", ".notes.tmp", ".other.abcdefgh.tmp"]
    assert (target / "keep.txt").read_text() == "keep"

    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(SelfReplayError) as e:
        with atomic_dir(link) as tmp:
            (tmp / "new.txt").write_text("new")
    one_line_error(e, "symbolic link")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == ["keep.txt"]
