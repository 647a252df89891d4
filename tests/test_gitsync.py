"""Unit tests for `consumer/gitsync.py`: snapshots of plain directories and git repositories.

Everything is local: git repositories in tmp dirs, and for the error-text checks an https URL on
127.0.0.1:9 (discard port, nothing listens: the connection is refused at once).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from consumer.gitsync import GitSync, GitSyncError
from gitfaas.settings import Settings

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, env=GIT_ENV, check=True, capture_output=True, text=True).stdout


def make_repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    return commit(path, files)


def commit(path: Path, files: dict[str, str], message: str = "change") -> str:
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(content)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD").strip()


def syncer(tmp_path: Path, url: str, **settings: object) -> GitSync:
    return GitSync(Settings(git_url=url, git_cache_dir=str(tmp_path / "cache"), **settings))


# ---- plain directories ---------------------------------------------------------------------------


def test_a_plain_directory_is_read_in_place_with_a_content_commit(tmp_path):
    source = tmp_path / "pipeline"
    source.mkdir()
    (source / "config.json").write_text('{"topics": []}')

    snapshot = syncer(tmp_path, str(source)).sync()

    assert snapshot.commit.startswith("dir-")
    assert snapshot.root == source.resolve()
    assert (snapshot.root / "config.json").read_text() == '{"topics": []}'


def test_a_plain_directory_commit_changes_when_a_file_changes(tmp_path):
    source = tmp_path / "pipeline"
    (source / "jobs").mkdir(parents=True)
    (source / "jobs" / "a.yaml").write_text("kind: Job\n")
    sync = syncer(tmp_path, str(source))

    first = sync.sync().commit
    assert sync.sync().commit == first  # nothing changed: same commit

    (source / "jobs" / "a.yaml").write_text("kind: Job\n# edited\n")
    edited = sync.sync().commit
    (source / "jobs" / "b.yaml").write_text("kind: Job\n")
    added = sync.sync().commit
    (source / "jobs" / "b.yaml").rename(source / "jobs" / "c.yaml")
    renamed = sync.sync().commit

    assert len({first, edited, added, renamed}) == 4
    assert all(commit.startswith("dir-") for commit in (edited, added, renamed))


def test_a_plain_directory_commit_changes_when_a_symlink_is_retargeted(tmp_path):
    source = tmp_path / "pipeline"
    source.mkdir()
    (source / "v1.yaml").write_text("kind: Job\nmetadata: {name: v1}\n")
    (source / "v2.yaml").write_text("kind: Job\nmetadata: {name: v2}\n")
    os.symlink("v1.yaml", source / "current.yaml")
    sync = syncer(tmp_path, str(source))
    first = sync.sync().commit

    (source / "current.yaml").unlink()
    os.symlink("v2.yaml", source / "current.yaml")

    assert sync.sync().commit != first


def test_a_missing_directory_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(GitSyncError, match="nowhere"):
        syncer(tmp_path, str(missing)).sync()


def test_no_git_url_is_an_error():
    with pytest.raises(GitSyncError, match="GIT_URL"):
        GitSync(Settings(git_url=""))


# ---- git repositories ----------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True], ids=["work-tree", "file-url"])
def test_a_git_repository_follows_the_branch_head(tmp_path, as_url):
    source = tmp_path / "origin"
    first = make_repo(source, {"config.json": '{"topics": []}', "a.yaml": "one\n"})
    sync = syncer(tmp_path, source.as_uri() if as_url else str(source))

    snapshot = sync.sync()
    assert snapshot.commit == first
    assert (snapshot.root / "a.yaml").read_text() == "one\n"
    assert snapshot.root.resolve() != source.resolve()  # a copy, not the work tree itself

    second = commit(source, {"a.yaml": "two\n", "b.yaml": "new\n"})
    assert second != first
    snapshot = sync.sync()

    assert snapshot.commit == second
    assert (snapshot.root / "a.yaml").read_text() == "two\n"
    assert (snapshot.root / "b.yaml").read_text() == "new\n"


def test_a_work_tree_is_read_at_its_commit_not_its_uncommitted_edits(tmp_path):
    source = tmp_path / "origin"
    head = make_repo(source, {"a.yaml": "committed\n"})
    (source / "a.yaml").write_text("uncommitted\n")

    snapshot = syncer(tmp_path, str(source)).sync()

    assert snapshot.commit == head
    assert (snapshot.root / "a.yaml").read_text() == "committed\n"


def test_the_configured_branch_is_followed(tmp_path):
    source = tmp_path / "origin"
    make_repo(source, {"a.yaml": "main\n"})
    git(source, "checkout", "-q", "-b", "prod")
    prod = commit(source, {"a.yaml": "prod\n"})
    git(source, "checkout", "-q", "main")

    snapshot = syncer(tmp_path, str(source), git_branch="prod").sync()

    assert snapshot.commit == prod
    assert (snapshot.root / "a.yaml").read_text() == "prod\n"


@pytest.mark.parametrize("as_url", [False, True], ids=["work-tree", "file-url"])
def test_an_unknown_branch_is_an_error_naming_the_branch(tmp_path, as_url):
    source = tmp_path / "origin"
    make_repo(source, {"a.yaml": "x\n"})

    with pytest.raises(GitSyncError, match="no-such-branch"):
        syncer(tmp_path, source.as_uri() if as_url else str(source), git_branch="no-such-branch").sync()


# ---- credentials never leak ----------------------------------------------------------------------


def test_display_source_hides_credentials():
    for url in ("https://user@git.example.com/org/repo.git", "https://user:pw-9x@git.example.com/org/repo.git"):
        shown = GitSync(Settings(git_url=url, git_personal_token="s3cr3t-token")).display_source
        assert shown == "https://git.example.com/org/repo.git"


def test_display_source_keeps_the_port():
    shown = GitSync(Settings(git_url="https://user:pw@git.example.com:8443/r.git")).display_source

    assert shown == "https://git.example.com:8443/r.git"


def test_display_source_keeps_an_ipv6_host_usable():
    shown = GitSync(Settings(git_url="https://user@[::1]:8443/r.git")).display_source

    assert shown == "https://[::1]:8443/r.git"


def test_display_source_leaves_a_plain_path_alone(tmp_path):
    assert GitSync(Settings(git_url=str(tmp_path))).display_source == str(tmp_path)


def test_an_unreachable_url_fails_without_showing_the_token(tmp_path):
    sync = syncer(tmp_path, "https://user@127.0.0.1:9/x.git", git_personal_token="s3cr3t-token")

    with pytest.raises(GitSyncError) as caught:
        sync.sync()

    text = str(caught.value)
    assert "127.0.0.1" in text  # it does say what failed
    assert "s3cr3t-token" not in text
    assert "s3cr3t-token" not in repr(caught.value)
    assert "s3cr3t-token" not in sync.display_source
    assert caught.value.__cause__ is None  # the raw git exception (with its command line) is not chained
