"""Reading input files and writing output files without leaving debris.

Every output of a run goes through :class:`StagedOutputs`: each file is first
written in full (and fsync'ed) to a hidden temporary file beside its target;
only when all of them have been written are they renamed into place. A failure
at any point (unwritable folder, full disk, an error in the program) removes
the temporary files, so a run leaves either all its outputs or none, and never
a partial file; files an earlier run left under the same names stay as they
were unless all the new ones are in place. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import uuid

from dials_qconsistency.errors import QConsistencyError

TEMPORARY_PREFIX = ".tmp-q_consistency-"


def read_input_file(path: str, what: str) -> bytes:
    """The bytes of an input file, or a one-line error naming it."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise QConsistencyError("file not found", path) from None
    except IsADirectoryError:
        raise QConsistencyError(f"is a directory, not {what}", path) from None
    except OSError as error:
        raise QConsistencyError(f"cannot be read ({error.strerror})", path) from None


def _write_fully(descriptor: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


class StagedOutputs:
    """A set of output files written all together or not at all.

    Use as a context manager: :meth:`add` writes a temporary file per output,
    :meth:`commit` renames them into place; leaving the block without a commit
    (an exception) removes every temporary file.
    """

    def __init__(self, prefix: str = TEMPORARY_PREFIX):
        self._prefix = prefix
        self._staged: list[tuple[str, str]] = []  # (temporary, target)
        self._made_folders: list[str] = []
        self._committed = False
        self._on_abort = []  # writers still busy with a staged file, stopped first
        self._pending = []  # writers finishing in the background: waited for before a commit

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    def make_folder(self, folder: str) -> None:
        """Create an output folder (and its parents); removed again on abort if still empty."""
        missing = []
        folder = os.path.abspath(folder)
        while folder and not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except OSError as error:
                raise QConsistencyError(f"cannot be created ({error.strerror})", path) from None
            self._made_folders.append(path)

    def add(self, path: str, payload) -> None:
        """Write ``payload`` (bytes, or a function that writes to a file
        descriptor) to a temporary file that will become ``path``. Should it
        fail, or a writer still busy have failed, the error of the file
        staged first is raised (a full disk is told about the table)."""
        if any(writer.failed() for writer in self._pending):
            self.wait_for_writers()
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise QConsistencyError("cannot be written (it is a directory)", path)
        try:
            descriptor, temporary = tempfile.mkstemp(prefix=self._prefix, dir=folder)
        except OSError as error:
            raise QConsistencyError(f"cannot be written ({error.strerror})", path) from None
        self._staged.append((temporary, path))
        failure = None
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(descriptor, 0o666 & ~umask)
            if callable(payload):
                payload(descriptor)
            else:
                _write_fully(descriptor, payload)
            os.fsync(descriptor)
        except OSError as error:
            failure = error
        finally:
            os.close(descriptor)
        if failure is not None:
            self.wait_for_writers()  # a table that failed first is told first
            raise QConsistencyError(f"cannot be written ({failure.strerror})", path) from None

    def reserve(self, path: str) -> str:
        """A temporary file that will become ``path``, for writers that need a
        file name (h5py, zipfile); the caller writes and closes it before commit."""
        self.add(path, b"")
        return self._staged[-1][0]

    def detach(self) -> list[tuple[str, str]]:
        """Hand the staged (temporary, target) pairs to another StagedOutputs
        (a worker process's files, committed by the run that merges them)."""
        self.wait_for_writers()
        staged, self._staged = self._staged, []
        self._on_abort = []  # their writers have finished
        return staged

    def adopt(self, temporary: str, path: str) -> None:
        """Take over a file staged elsewhere: committed or removed with the rest."""
        self._staged.append((temporary, path))

    @property
    def committed(self) -> bool:
        return self._committed

    def commit(self) -> list[str]:
        """Rename every staged file into place; returns the target paths.
        Should one rename fail, the files renamed before it are taken back
        and the files they replaced (an earlier run's) put back."""
        self.wait_for_writers()
        for temporary, path in self._staged:  # files written by others since they were reserved
            try:
                descriptor = os.open(temporary, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            except OSError as error:
                raise QConsistencyError(f"cannot be written ({error.strerror})", path) from None
        replaced = []  # (target, the file it replaced kept aside, or None), in rename order
        with signals_held():  # Ctrl-C or SIGTERM now would leave some files new and some old: after, not during
            try:
                while self._staged:
                    temporary, path = self._staged[0]
                    kept = _keep_aside(path, self._prefix)
                    try:
                        os.replace(temporary, path)
                    except OSError as error:
                        if kept:
                            _remove(kept)
                        raise QConsistencyError(f"cannot be written ({error.strerror})", path) from None
                    self._staged.pop(0)
                    replaced.append((path, kept))
            except BaseException:
                for path, kept in reversed(replaced):  # all or nothing: put back what was there
                    _put_back(path, kept)
                raise
            self._committed = True
            self._on_abort = []
            for _, kept in replaced:
                if kept:
                    _remove(kept)
        return [path for path, _ in replaced]

    def finish_later(self, writer) -> None:
        """``writer`` (a ``backends.TableWrite``, closed) is still writing a
        staged file: its ``finish()``, which waits and raises its error, is
        called before the files are committed or detached, or as soon as
        another file is added after it ``failed()`` (the first error is told)."""
        self._pending.append(writer)

    def wait_for_writers(self) -> None:
        while self._pending:
            self._pending.pop(0).finish()

    def on_abort(self, stop) -> None:
        """Call ``stop()`` before the temporary files are removed on abort."""
        self._on_abort.append(stop)

    def abort(self) -> None:
        """Remove every temporary file not yet committed."""
        self._pending = []
        while self._on_abort:
            self._on_abort.pop()()
        while self._staged:
            _remove(self._staged.pop()[0])
        if not self._committed:
            for folder in reversed(self._made_folders):
                try:
                    os.rmdir(folder)  # only if empty
                except OSError:
                    pass
            self._made_folders = []


@contextlib.contextmanager
def signals_held():
    """Within the block Ctrl-C (SIGINT) and SIGTERM wait: their handlers run
    when it ends. (Python runs signal handlers in the main thread whichever
    thread the signal reaches, so they are swapped there for one that notes
    the signal; elsewhere the block is not held.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {number: signal.signal(number, lambda received, frame: caught.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # Ctrl-C: KeyboardInterrupt; SIGTERM: the program's own
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def _keep_aside(path: str, prefix: str) -> str | None:
    """A second name (a hard link, beside it) for the file at ``path`` that a
    rename is about to replace, so that it can be put back; None if there is
    none or the file system cannot link (it is then lost should a later
    rename of the same commit fail)."""
    if not os.path.lexists(path):
        return None
    kept = os.path.join(os.path.dirname(os.path.abspath(path)), f"{prefix}kept-{uuid.uuid4().hex}")
    try:
        os.link(path, kept, follow_symlinks=False)
    except OSError:
        return None
    return kept


def _put_back(path: str, kept: str | None) -> None:
    """Undo a rename onto ``path``: the file it replaced back (``kept``), or none."""
    try:
        if kept:
            os.replace(kept, path)
        else:
            os.unlink(path)
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_leftovers(folders, prefix: str) -> None:
    """Remove temporary files starting with ``prefix`` (a run's own, after its
    workers were stopped mid-write)."""
    for folder in set(folders):
        try:
            names = os.listdir(folder or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix):
                _remove(os.path.join(folder or ".", name))


def write_atomically(path: str, payload) -> None:
    """Write one file all-or-nothing (a temporary file, then a rename)."""
    with StagedOutputs() as outputs:
        outputs.add(path, payload)
        outputs.commit()
