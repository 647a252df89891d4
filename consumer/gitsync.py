"""Keeping a local copy of the pipeline repository at the branch's newest commit.

Sources, by `GIT_URL`:
- a URL (https, ssh, `file://`) or a local git work tree: cloned once into a cache folder, then
  fetched and hard-reset to `origin/<branch>`; the snapshot is the commit's tree on disk.
- a plain local directory (no `.git`): read as it is on disk; its "commit" is a hash of the
  content, so editing a file and refreshing shows a new commit.

GitPython is blocking; callers run `sync()` in a thread. The token is only ever placed in the
URL handed to git and is scrubbed from every error text.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import git

from gitfaas.settings import Settings


class GitSyncError(RuntimeError):
    """Syncing failed; the message is safe to log and show (no secrets)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    commit: str
    root: Path


def _is_url(source: str) -> bool:
    return "://" in source or (source.count(":") == 1 and "@" in source.split(":")[0])


class GitSync:
    def __init__(self, settings: Settings) -> None:
        self.source = settings.git_url
        self.branch = settings.git_branch
        self._user = settings.git_user_name
        self._token = settings.git_personal_token
        self._ssh_key = settings.git_ssh_key_file
        self._cache_dir = Path(settings.git_cache_dir) if settings.git_cache_dir else None
        self._lock = threading.Lock()  # one sync at a time: poll, refresh and start-up may race
        self._repo: git.Repo | None = None
        if not self.source:
            raise GitSyncError("GIT_URL is not set: give a repository URL or a local directory")

    @property
    def display_source(self) -> str:
        """The source as it may appear in logs and `/topics`: no credentials."""
        if _is_url(self.source):
            try:
                parts = urlsplit(self.source)
            except ValueError:  # e.g. an unclosed IPv6 bracket: show nothing that could hold a password
                return "(GIT_URL is not a valid URL)"
            if "@" in parts.netloc:
                host = parts.netloc.rsplit("@", 1)[1]  # keeps [IPv6] brackets and the port
                return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        return self.source

    def sync(self) -> Snapshot:
        with self._lock:
            try:
                return self._sync()
            except git.GitCommandError as exc:
                raise GitSyncError(self._scrub(f"git {exc.command[1] if len(exc.command) > 1 else ''} "
                                               f"failed: {(exc.stderr or exc.stdout or '').strip()}")) from None
            except GitSyncError as exc:
                raise GitSyncError(self._scrub(str(exc))) from None
            except Exception as exc:  # noqa: BLE001 — whatever GitPython raises, its text may hold the URL
                raise GitSyncError(self._scrub(f"{type(exc).__name__}: {exc}")) from None

    def _sync(self) -> Snapshot:
        local = Path(self.source).expanduser()
        if not _is_url(self.source):
            if not local.is_dir():
                raise GitSyncError(f"GIT_URL {self.source!r} is neither a URL nor an existing directory")
            if not (local / ".git").exists() and not (local / "HEAD").is_file():
                return Snapshot(commit=content_hash(local), root=local.resolve())
        if self._repo is None:
            self._repo = self._clone()
        else:
            self._fetch(self._repo)
        repo = self._repo
        return Snapshot(commit=repo.head.commit.hexsha, root=Path(repo.working_tree_dir or "."))

    def _remote_url(self) -> str:
        if not _is_url(self.source):
            return str(Path(self.source).expanduser().resolve())
        parts = urlsplit(self.source)
        if parts.scheme in ("http", "https") and self._token:
            user = quote(self._user or "gitfaas", safe="")
            host = parts.netloc.rsplit("@", 1)[-1]
            netloc = f"{user}:{quote(self._token, safe='')}@{host}"
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return self.source

    def _env(self) -> dict[str, str]:
        env = {"GIT_TERMINAL_PROMPT": "0"}
        if self._ssh_key:
            env["GIT_SSH_COMMAND"] = (f"ssh -i {shlex.quote(self._ssh_key)} -o IdentitiesOnly=yes "
                                      "-o StrictHostKeyChecking=accept-new")
        return env

    def _clone(self) -> git.Repo:
        base = self._cache_dir or Path(tempfile.mkdtemp(prefix="gitfaas-git-"))
        target = base / "repo"
        if target.exists():
            shutil.rmtree(target)
        base.mkdir(parents=True, exist_ok=True)
        try:
            return git.Repo.clone_from(
                self._remote_url(), target, branch=self.branch, single_branch=True, env=self._env()
            )
        except git.GitCommandError as exc:
            if "Remote branch" in (exc.stderr or "") and "not found" in (exc.stderr or ""):
                raise GitSyncError(f"branch {self.branch!r} not found in {self.display_source}") from None
            raise

    def _fetch(self, repo: git.Repo) -> None:
        with repo.git.custom_environment(**self._env()):
            repo.remotes.origin.set_url(self._remote_url())
            repo.remotes.origin.fetch(f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}")
            repo.git.reset("--hard", f"origin/{self.branch}")
            repo.git.clean("-fdx")

    def _secrets(self) -> list[str]:
        """The token, and a password written into GIT_URL itself, as they may be spelled in git's output."""
        found = [self._token] if self._token else []
        if _is_url(self.source):
            try:
                password = urlsplit(self.source).password
            except ValueError:
                password = None
            if password:
                found += [password, unquote(password)]
        spellings = {spelled for secret in found for spelled in (secret, quote(secret, safe=""), quote(secret))}
        return sorted((s for s in spellings if s), key=len, reverse=True)  # longest first: no partial leftovers

    def _scrub(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text


def content_hash(root: Path) -> str:
    """A stable "commit" for a plain directory: changes whenever a file's path or bytes change."""
    digest = hashlib.sha256()
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".gitfaas", "__pycache__"))
        for name in sorted(filenames):
            path = Path(directory, name)
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            if path.is_symlink():  # retargeting a link is a change, whatever it points to
                digest.update(b"link:" + os.readlink(path).encode() + b"\0")
            elif path.is_file():
                digest.update(path.read_bytes())
                digest.update(b"\0")
    return "dir-" + digest.hexdigest()[:16]
