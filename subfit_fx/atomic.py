"""Outputs appear complete or not at all: write into a temporary sibling, rename into place.

A run claims its output first (`claim`: a lock file beside it, held with `flock`, so the claim
dies with its process, even on SIGKILL): a second run on the same output fails at once instead
of replacing the first one's result, and the next run after a killed one removes what it left.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    >>> sorted(p.name for p in (root / "out").iterdir())
    ['a.txt']
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from subfit_fx.errors import InputError, OutputExistsError
from subfit_fx.interrupts import raise_if_interrupted

__all__ = ["atomic_dir", "atomic_file", "check_not_input", "check_output", "claim", "relax_permissions"]

_HELD: dict[Path, int] = {}  # outputs this process has claimed, with nesting depth


def relax_permissions(path: Path) -> None:
    """Give a finished output the permissions a plain `mkdir` / `open` would (temporary files are
    created private: 0700 / 0600).

    Example:
        >>> relax_permissions(Path("out"))  # doctest: +SKIP
    """
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def check_not_input(path: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (symlinks resolved).

    Example:
        >>> check_not_input(Path("model/out"), [Path("model")])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: output 'model/out' lies in or over the input 'model'; ...
    """
    target = Path(path).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise InputError(f"output '{path}' lies in or over the input '{given}'; choose an output path "
                             "outside it")


def check_output(path: Path, force: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an existing output unless `force`, and an output that is, contains or lies inside one
    of `inputs` (symlinks resolved: a forced write must never delete what it reads); check the
    parent is a writable directory.

    Example:
        >>> check_output(Path("/nonexistent-dir/x"), force=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: ...
    """
    path = Path(path)
    check_not_input(path, inputs)
    if path.name in ("", ".", ".."):
        raise InputError(f"output '{path}' names no new file or directory; pass a path such as '{path}/out'")
    if path.is_symlink():  # replacing a link would leave its target, a dangling one cannot be renamed over
        raise InputError(f"output '{path}' is a symbolic link; pass the path it points to, or another path")
    special = next((fs for fs in ("/proc", "/sys", "/dev") if path.resolve().is_relative_to(fs)), None)
    if special:
        raise InputError(f"output '{path}' is on the special filesystem {special}; choose a path on a disk")
    if path.exists() and not force:
        raise OutputExistsError(f"output '{path}' already exists; pass --force to replace it or choose "
                                "another path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InputError(f"cannot write '{path}': directory '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write '{path}': directory '{parent}' is not writable; choose a "
                         "writable location")


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold `path` for this process for the block: refuse it (`InputError`) while another live
    process holds it, and remove the temporary siblings a killed run left (a `--force` output it
    had moved aside is put back). Nested claims of one path in one process are free.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "out"
        >>> with claim(out):
        ...     sorted(p.name for p in out.parent.iterdir())
        ['.out.lock']
        >>> list(out.parent.iterdir())
        []
    """
    key = Path(path).absolute().parent.resolve() / Path(path).name
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = key.with_name(f".{key.name}.lock")
    fd = _lock(lock, path)
    try:
        _remove_leftovers(key)
        _HELD[key] = 1
        yield
    finally:
        _HELD.pop(key, None)
        lock.unlink(missing_ok=True)  # before the lock is released: never another run's file
        os.close(fd)


def _lock(lock: Path, path: Path) -> int:
    """Open and flock `lock`; fail at once when a live process holds it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise InputError(f"cannot write '{path}': {exc.strerror} creating '{lock.name}' beside it; choose a "
                             "writable location") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"output '{path}' is being written by another run (pid {pid}); wait for it to "
                             "finish or choose another output") from None
        # a finishing holder unlinks the file before releasing it: a lock on that old file holds nothing
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _remove_leftovers(path: Path) -> None:
    """Temporary siblings of `path` from a killed run (only names our writers make, exactly)."""
    name = re.escape(path.name)
    for sibling in path.parent.iterdir():
        if re.fullmatch(rf"\.{name}\.[a-z0-9_]{{8}}\.partial", sibling.name):
            shutil.rmtree(sibling) if sibling.is_dir() else sibling.unlink()
        elif re.fullmatch(rf"\.{name}\.old-\d+", sibling.name):
            if path.exists() or path.is_symlink():
                shutil.rmtree(sibling) if sibling.is_dir() else sibling.unlink()
            else:  # killed between moving the old output aside and moving the new one in
                sibling.rename(path)


@contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on error it vanishes.

    Example:
        >>> with atomic_dir(Path("out")) as tmp: ...  # doctest: +SKIP
    """
    path = Path(path)
    check_output(path, force)
    with claim(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent))
        try:
            yield tmp
            raise_if_interrupted()
            relax_permissions(tmp)
            if path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def atomic_file(path: Path, force: bool = False, companions: Sequence[str] = ()) -> Iterator[Path]:
    """Yield `path`'s name inside a temporary sibling directory; on success the file replaces
    `path`, on error nothing changes.

    `companions` are file names written beside it (an ONNX weights sidecar): they move into place
    first, so the file never appears without them; one the new output lacks is removed (it belonged
    to the replaced output).

    Example:
        >>> with atomic_file(Path("model.onnx"), companions=["model.onnx.data"]) as tmp: ...  # doctest: +SKIP
    """
    path = Path(path)
    check_output(path, force)
    with claim(path):
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.absolute().parent))
        try:
            staged = tmpdir / path.name
            yield staged
            if not staged.is_file():
                raise FileNotFoundError(f"nothing was written to {staged}")
            raise_if_interrupted()
            for name in companions:
                if (tmpdir / name).is_file():
                    relax_permissions(tmpdir / name)
                    os.replace(tmpdir / name, path.with_name(name))
                else:
                    path.with_name(name).unlink(missing_ok=True)
            relax_permissions(staged)
            os.replace(staged, path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
