"""Owning an output folder for the length of a run.

A run builds its output in a hidden sibling `.NAME.partial-HOST-PID-RANDOM`, created with
`mkdir` (which, like O_EXCL, fails if the name exists), holding an owner file created with
O_EXCL and kept locked (`flock`) while the run lives: the lock dies with the process, even
under kill -9, so any other run can tell a live partial from a stale one. Host and random
token keep two containers whose runs are both PID 1 apart.

At the start, stale partials of the same output (unlocked owner file) are removed, with their
size logged, or handed to `--resume`; a live one means another run writes this output, and
the later of the two stops. At the end, everything is fsynced and the partial renamed into
place only if `-o` is as it was at the start: a folder that appeared meanwhile is never
replaced. Nothing this run did not create is removed, except an old output `--overwrite`
was asked to replace.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .safetensors_reader import CheckpointError, open_sequence, opened_since

logger = logging.getLogger(__name__)

OWNER_FILE = ".stream_readapt-owner.json"
JOURNAL_FILE = ".stream_readapt-journal.json"
_ACTIVE: dict[Path, "OutputFolder"] = {}  # partial folder -> its owner, for the writers inside it


@dataclass(frozen=True)
class Owner:
    """Who is building a partial folder."""

    host: str
    pid: int
    token: str
    started_ns: int

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {time.strftime('%H:%M:%S', time.localtime(self.started_ns / 1e9))}"


@dataclass
class Partial:
    """A partial folder of this output found at the start."""

    path: Path
    owner: Owner | None  # None: no readable owner file (an older version's, or not ours)
    live: bool

    def size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())
        except OSError:  # being removed meanwhile
            return 0


def active_output(folder: str | os.PathLike) -> "OutputFolder | None":
    """The OutputFolder whose partial folder is `folder` (None outside a run)."""
    return _ACTIVE.get(Path(folder))


def _read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _is_locked(owner_file: Path) -> bool:
    try:
        fd = os.open(owner_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one


def find_partials(output: Path) -> list[Partial]:
    """Partial folders of `output` (its hidden `.NAME.partial-*` siblings), oldest first."""
    found = []
    for path in sorted(output.parent.glob(f".{glob.escape(output.name)}.partial-*")):
        if path.is_dir() and not path.is_symlink():
            owner = _read_owner(path / OWNER_FILE)
            found.append(Partial(path, owner, owner is not None and _is_locked(path / OWNER_FILE)))
    return sorted(found, key=lambda p: p.owner.started_ns if p.owner else 0)


def _identity(path: Path) -> tuple | None:
    """What -o is now: absent (None), or (kind, device, inode, empty, mtime, ctime)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    # Times too: a folder removed and made again may get the same inode number.
    if path.is_symlink():
        return ("link", st.st_dev, st.st_ino, None, st.st_mtime_ns, st.st_ctime_ns)
    empty = path.is_dir() and not any(path.iterdir())
    return ("dir" if path.is_dir() else "file", st.st_dev, st.st_ino, empty, st.st_mtime_ns, st.st_ctime_ns)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (renameat2 RENAME_NOREPLACE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # old libc: check, then rename (a tiny window)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
        return
    at_fdcwd, noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):  # a file system without it
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), str(dst))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file in `folder`, then the folder itself: data and names on disk before the rename."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            fsync_path(p)
    fsync_path(folder)


# Headers, index, manifest, config and tokenizer beyond the tensor bytes, and file-system slack.
SPACE_MARGIN = 2**20


def check_free_space(folder: Path, nbytes: int) -> None:
    """OSError up front, before any byte is written, when `folder`'s file system cannot hold `nbytes`."""
    free = shutil.disk_usage(folder).free
    if nbytes + nbytes // 100 + SPACE_MARGIN > free:
        raise OSError(f"{folder.parent}: not enough free space: the output needs {_human(nbytes)}, "
                      f"the file system has {_human(free)} free; free some or choose another -o")


def raise_allocation_error(e: BaseException, name: str, shape, device) -> None:
    """Re-raise an allocation failure naming the tensor and what it needed; anything else as is."""
    text = str(e)
    if not isinstance(e, MemoryError) and "alloc" not in text.lower() and "out of memory" not in text.lower():
        raise e
    need = 4
    for d in shape:
        need *= d
    raise MemoryError(f"tensor {name!r} {list(shape)}: not enough memory on {device} for its float32 matrix "
                      f"({_human(need)}, plus the SVD's workspace): {text.splitlines()[0] if text else type(e).__name__}; "
                      "try --device cuda, or --embeddings full for a vocabulary matrix") from None


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class OutputFolder:
    """Own `path` for one run: build in a hidden, locked sibling; rename into place when complete.

    A failure (bad input, NaN, full disk) removes the partial folder; a signal (Ctrl-C,
    SIGTERM, SIGHUP) keeps it when it holds finished shards, for `--resume`.

    Example:
        >>> with OutputFolder("out", overwrite=False) as tmp:
        ...     (tmp / "model.safetensors").write_bytes(data)
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, inputs=(), resume: bool = False):
        self.path = Path(path)
        self.overwrite, self.resume = overwrite, resume
        _refuse_input_in_the_way(self.path, inputs)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path}: exists and is not a folder")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise FileExistsError(f"{self.path}: output folder is not empty (pass --overwrite to replace it)")
        self.mark = open_sequence()  # inputs are opened after this: their files are watched
        self.tmp: Path | None = None
        self.adopted: Path | None = None  # the stale partial a resumed run continues
        self._lock_fd: int | None = None

    # -- start ------------------------------------------------------------------
    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = _identity(self.path)
        if self.started is not None and not self.overwrite and not self.started[3]:  # filled since __init__
            raise FileExistsError(f"{self.path}: output folder is not empty (pass --overwrite to replace it)")
        self.owner = Owner(socket.gethostname(), os.getpid(), secrets.token_hex(4), time.time_ns())
        self.tmp = self.path.parent / f".{self.path.name}.partial-{self.owner.host}-{self.owner.pid}-{self.owner.token}"
        os.mkdir(self.tmp)  # fails if the name exists: never someone else's folder
        try:
            self._write_owner()
            self._handle_other_partials()
        except BaseException:
            self._release(remove=True)
            raise
        self.input_states = {str(f.path.resolve()): list(f.state) for f in opened_since(self.mark)}
        _ACTIVE[self.tmp] = self
        return self.tmp

    def _write_owner(self) -> None:
        fd = os.open(self.tmp / OWNER_FILE, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps(asdict(self.owner)).encode())
        os.fsync(fd)
        self._lock_fd = fd

    def _handle_other_partials(self) -> None:
        others = [p for p in find_partials(self.path) if p.path != self.tmp]
        for p in others:
            if p.live and (p.owner.started_ns, p.path.name) < (self.owner.started_ns, self.tmp.name):
                raise FileExistsError(f"{self.path}: another run ({p.owner.describe()}) is writing this output; "
                                      "wait for it or choose another -o")
        stale = [p for p in others if not p.live]
        if self.resume:
            self.adopted = _newest_with_journal(stale)
        for p in stale:
            if p.owner is None:
                logger.warning("%s: partial folder of an older run (%s), not created by this version: "
                               "left as is; remove it yourself", p.path, _human(p.size()))
            elif p.path != self.adopted:
                logger.warning("removing %s, the partial output of a dead run (%s, %s)", p.path, p.owner.describe(),
                               _human(p.size()))
                remove_tree(p.path)
        if self.resume and self.adopted is None:
            logger.warning("%s: --resume: no partial output of an earlier run to resume; starting afresh", self.path)

    # -- end --------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> None:
        _ACTIVE.pop(self.tmp, None)
        if exc_type is None:
            self._commit()
            return
        keep = issubclass(exc_type, KeyboardInterrupt) and _finished_shards(self.tmp) > 0
        if keep:  # the CLI says so; a run without --resume removes it
            exc.kept_partial = str(self.tmp)
        self._release(remove=not keep)

    def _commit(self) -> None:
        try:
            for f in opened_since(self.mark):
                f.check_unchanged()
            self._check_unmoved(keep=True)
        except BaseException as e:
            self._release(remove=not isinstance(e, FileExistsError))
            raise
        try:
            (self.tmp / JOURNAL_FILE).unlink(missing_ok=True)
            if self.adopted is not None:
                remove_tree(self.adopted)  # a LoRE run adopts nothing from it
            os.unlink(self.tmp / OWNER_FILE)  # the lock holds through our descriptor until released
            fsync_tree(self.tmp)
            self._check_unmoved(keep=False)
            self._publish()
        except BaseException:
            self._release(remove=True)
            raise
        self._release(remove=False)

    def _check_unmoved(self, *, keep: bool) -> None:
        """-o must be as it was at the start: whatever appeared there is someone else's."""
        if _identity(self.path) != self.started:
            where = f"the finished result is kept in {self.tmp} (--resume finishes it)" if keep else "this run's output was discarded"
            raise FileExistsError(f"{self.path}: created or changed by someone else during the run; left untouched, "
                                  f"{where}")

    def _publish(self) -> None:
        now = self.started
        if now is None or now[3]:  # absent or (still) empty: nothing to replace
            if now is not None:
                os.rmdir(self.path)  # the empty folder that was there at the start (fails if filled since)
            _rename_noreplace(self.tmp, self.path)
        else:
            self._replace_existing()
        fsync_path(self.path.parent)

    def _replace_existing(self) -> None:
        old = self.path.parent / f".{self.path.name}.old-{self.owner.token}"
        os.rename(self.path, old)
        _rename_noreplace(self.tmp, self.path)
        if old.is_symlink():  # -o named a link: the link goes, never what it pointed to
            old.unlink()
        else:
            remove_tree(old)

    def _release(self, *, remove: bool) -> None:
        if remove and self.tmp is not None:
            remove_tree(self.tmp)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _finished_shards(folder: Path) -> int:
    from .resume import Journal

    journal = Journal.read(folder / JOURNAL_FILE)
    return len(journal.shards) if journal else 0


def _newest_with_journal(stale: list[Partial]) -> Path | None:
    with_journal = [p for p in stale if p.owner is not None and (p.path / JOURNAL_FILE).is_file()]
    return with_journal[-1].path if with_journal else None


def _refuse_input_in_the_way(output: Path, inputs) -> None:
    """An output that is, or holds, one of the inputs would replace it (--overwrite deletes
    the old folder): refuse, whatever the flags."""
    out = output.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a Hub id: it lives in the cache
        src = Path(given).resolve()
        if src == out or out in src.parents:
            raise FileExistsError(f"{output}: the output folder would replace the input {given}; choose another -o")


__all__ = ["CheckpointError", "OutputFolder", "active_output", "find_partials", "fsync_tree"]
