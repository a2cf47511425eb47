"""Provenance without side effects: reading the source checkout's commit writes nothing into it."""

import os
import subprocess
import time

import pytest

from selfreplay.train.files import git_commit


def _git(repo, *args) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git checkout laid out as selfreplay's source (pyproject.toml, src/selfreplay/)."""
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    package = tmp_path / "src" / "selfreplay"
    package.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (package / "module.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_reading_the_commit_never_writes_the_checkouts_index(checkout):
    index = checkout / ".git" / "index"
    time.sleep(1.1)  # a later mtime on a tracked file makes a plain `git status` rewrite the index
    os.utime(checkout / "src" / "selfreplay" / "module.py")
    before = os.stat(index)
    commit = git_commit(checkout / "src" / "selfreplay")
    after = os.stat(index)
    assert commit == _git(checkout, "rev-parse", "HEAD")  # content unchanged: not dirty
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (checkout / ".git" / "index.lock").exists()


def test_a_changed_tracked_file_marks_the_commit_dirty(checkout):
    (checkout / "src" / "selfreplay" / "module.py").write_text("x = 2\n")
    assert git_commit(checkout / "src" / "selfreplay") == _git(checkout, "rev-parse", "HEAD") + "+dirty"


def test_a_copy_inside_another_repository_has_no_commit(checkout):
    installed = checkout / "venv" / "site-packages" / "selfreplay"  # e.g. a venv inside the user's project
    installed.mkdir(parents=True)
    assert git_commit(installed) is None
