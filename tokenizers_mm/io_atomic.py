"""Writing outputs atomically, reading safetensors safely, and one-line errors for output paths.

Every file onemodel writes (images, ``.npy``, JSON, shards, model and tokenizer directories, reports, generate
outputs) goes through this module, so a failed or interrupted command never leaves a half-written file under
its final name, and a failed command leaves nothing new behind (no partial files, no empty directories it
created). It lives in ``tokenizers_mm`` because that is the bottom package: ``tokenizers_mm``, ``onemodel`` and
``training`` can all import it (``tokenizers_mm`` may not import ``onemodel``). Standard library only at import.

API::

    from tokenizers_mm.io_atomic import (OutputPathError, check_output_dir, check_output_file, atomic_file,
        atomic_directory, write_bytes, write_text, write_json, save_npy, save_image, save_safetensors,
        read_safetensors)

    # one file: written to a hidden temporary name in the same directory, fsynced, renamed over ``path``
    write_json("out/results.json", {"a": 1})            # also write_bytes / write_text / save_npy / save_image
    save_safetensors("m/model.safetensors", tensors, metadata={"format": "pt"})
    with atomic_file("out/x.bin") as tmp:                # anything that writes a file at ``tmp``
        write_somehow(tmp)

    # a set of files in one directory (generate --out, a report, a model directory, a dataset):
    with atomic_directory("out") as tmp:                 # tmp: a hidden staging directory beside (or in) "out"
        save_npy(tmp / "depth.npy", depth)               # (plain writes inside tmp are fine too)
        (tmp / "sub").mkdir()
    # success: every top-level entry of tmp replaces the entry of the same name in "out" (mode="merge", other
    # entries of "out" are kept), or "out" is replaced as a whole (mode="replace"); a new "out" appears only now.
    # Failure (any exception): tmp and the missing parents it had to create are removed, "out" is untouched.

    # writers that manage their own temporary names (shards): create directories, undo on failure
    created = make_dirs("data/mine/train")              # the directories it created, outermost first
    remove_dirs(created)                                 # rmdir them (only the empty ones), innermost first

    # up-front checks (cheap; the writes above check again and translate their own OSErrors):
    check_output_dir("out", what="--out")                # exists as a file? not writable? read-only? disk full?
    check_output_file("out/report.html", what="--report")
    is_disk_full("out")                                  # no block left on its filesystem (after a failed write)

    # reading: every safetensors read goes through this one function
    tensors, metadata = read_safetensors("m/model.safetensors", device="cpu")   # bad file -> ValueError

Errors: :class:`OutputPathError` is both an ``OSError`` (with ``errno`` and ``filename``) and a ``ValueError``,
so the CLI reports it as one line with exit code 2; its message names the path, the problem and what to do:
``cannot write 'out/depth.npy': no space left on device; free some space or choose another directory``.
A run killed outright (``kill -9``) can leave a hidden ``.NAME.partial-PID`` entry beside (or in) its target;
the next write to the same target removes the ones whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "OutputPathError",
    "output_error",
    "check_output_dir",
    "check_output_file",
    "atomic_file",
    "atomic_directory",
    "fsync_dir",
    "write_bytes",
    "write_text",
    "write_json",
    "save_npy",
    "save_image",
    "save_safetensors",
    "read_safetensors",
    "make_dirs",
    "remove_dirs",
    "is_disk_full",
    "PARTIAL_MARK",
    "STORAGE_ERRNOS",
]

PARTIAL_MARK = ".partial-"  # hidden staging names: ".NAME.partial-PID"

# errno -> (problem, what to do)
_REASONS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another directory"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another directory"),
    errno.EFBIG: ("file too large for this filesystem", "choose a directory on another filesystem"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable directory"),
    errno.EACCES: ("permission denied", "choose a directory you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a directory you can write to, or fix its permissions"),
    errno.EEXIST: ("it already exists", "remove it or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("it is a directory", "pass a file path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error", "check the disk, or choose another directory"),
}
# errnos that are about the output location even when the OSError carries no filename (a failed write())
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class OutputPathError(OSError, ValueError):
    """An output path cannot be written: one line naming the path, the problem and the fix."""

    def __init__(self, path: str | Path, problem: str, fix: str, err_no: int | None = None) -> None:
        message = f"cannot write {str(path)!r}: {problem}; {fix}"
        super().__init__(err_no if err_no is not None else errno.EINVAL, message)
        self.filename = str(path)
        self.problem, self.fix = problem, fix

    def __str__(self) -> str:  # OSError's default adds "[Errno N]" and the filename twice
        return self.strerror


def output_error(path: str | Path, err: OSError) -> OutputPathError:
    """Translate an ``OSError`` raised while writing ``path`` into an :class:`OutputPathError`."""
    if isinstance(err, OutputPathError):
        return err
    problem, fix = _REASONS.get(err.errno, (err.strerror or type(err).__name__, "choose another output path"))
    return OutputPathError(path, problem, fix, err.errno)


# ------------------------------------------------------------------------------------------- up-front checks


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_dir(directory: Path, target: Path, what: str) -> None:
    if not directory.is_dir():
        raise OutputPathError(target, f"{str(directory)!r} is a file, not a directory", f"choose another {what}",
                              errno.ENOTDIR)
    if not os.access(directory, os.W_OK | os.X_OK):
        code = errno.EROFS if _is_read_only_fs(directory) else errno.EACCES
        raise output_error(target, OSError(code, os.strerror(code)))
    if is_disk_full(directory):
        raise output_error(target, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def is_disk_full(directory: Path) -> bool:
    """True when the filesystem holding ``directory`` has no block left for us."""
    try:
        st = os.statvfs(_nearest_existing(directory))
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        return False
    return st.f_bavail == 0 and st.f_blocks > 0


def _is_read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """Fail early (``OutputPathError``) if ``path`` cannot become or be written as a directory: it exists as a
    file, its nearest existing parent is a file or not writable, the filesystem is read-only or full."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(path, "it exists and is a file, not a directory",
                              f"remove it or choose another {what}", errno.EEXIST)
    _check_writable_dir(_nearest_existing(path), path, what)
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Fail early (``OutputPathError``) if ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, "it is a directory", f"pass a file path as the {what}", errno.EISDIR)
    _check_writable_dir(_nearest_existing(path.parent), path, what)
    return path


# ------------------------------------------------------------------------------------------- helpers


def _partial_name(path: Path, inside: bool = False) -> Path:
    """The staging name of ``path``: beside it, or (``inside``) in it, so that the final renames stay on one
    filesystem even when ``path`` is a mount point."""
    return (path if inside else path.parent) / f".{path.name}{PARTIAL_MARK}{os.getpid()}"


def _remove_stale_partials(path: Path, inside: bool = False) -> None:
    """Remove ``.NAME.partial-PID`` leftovers of dead processes beside (or in) ``path``."""
    parent = path if inside else path.parent
    if not parent.is_dir():
        return
    prefix = f".{path.name}{PARTIAL_MARK}"
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        _remove(entry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename in it survives a crash); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_parents(directory: Path, target: Path) -> list[Path]:
    """``mkdir -p directory``; return the directories created (deepest last)."""
    missing = []
    p = directory
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                _remove_dirs(created)
                raise OutputPathError(target, f"{str(d)!r} is a file, not a directory", "choose another path",
                                      errno.ENOTDIR) from None
            continue
        except OSError as err:
            _remove_dirs(created)
            raise output_error(target, err) from err
        created.append(d)
    return created


def make_dirs(directory: str | Path) -> list[Path]:
    """``mkdir -p directory``; return the directories it created (outermost first) for :func:`remove_dirs`.
    ``OSError`` -> :class:`OutputPathError`."""
    directory = Path(directory)
    check_output_dir(directory)
    return _make_parents(directory, directory)


def remove_dirs(created: list[Path]) -> None:
    """Remove the directories :func:`make_dirs` created, innermost first, where they are empty."""
    _remove_dirs(created)


def _remove_dirs(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            pass


def _relative(name: Any, staging: Path) -> Path | None:
    if not isinstance(name, str):
        return None
    try:
        return Path(name).relative_to(staging)
    except ValueError:
        return None


def _translate(err: OSError, staging: Path, target: Path) -> OSError:
    """An OSError raised while writing into ``staging``: name the final path instead of the staging one.
    Errors about other paths (an input file that does not exist) are returned unchanged."""
    name = err.filename if isinstance(err.filename, str) else None
    if name is not None:
        try:
            rel = Path(name).relative_to(staging)
        except ValueError:
            return err
        return output_error(target / rel if rel.parts else target, err)
    if err.errno in STORAGE_ERRNOS:
        return output_error(target, err)
    return err


# ------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path`` (parents created
    then); on any exception remove it (and the parents it created). ``OSError`` -> :class:`OutputPathError`."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(path, "it is a directory", "pass a file path", errno.EISDIR)
    _check_writable_dir(_nearest_existing(path.parent), path, "output path")
    created = _make_parents(path.parent, path)
    _remove_stale_partials(path)
    tmp = _partial_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic_file: nothing was written to {tmp}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        full = isinstance(err, OSError) and is_disk_full(path.parent)
        _remove(tmp)
        _remove_dirs(created)
        if full and not isinstance(err, OutputPathError):  # numpy reports a full disk in its own words
            raise output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from err
        if isinstance(err, OSError) and not isinstance(err, OutputPathError):
            named = err.filename in (str(tmp), str(path))
            if named or (err.filename is None and err.errno in STORAGE_ERRNOS):
                raise output_error(path, err) from err
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, mode: str = "merge") -> Iterator[Path]:
    """Yield a hidden staging directory beside ``path`` (in it, when ``path`` exists and ``mode="merge"``: the
    renames then stay on one filesystem even for a mount point); move its contents into ``path`` when the block
    ends without an exception. ``mode="merge"``: each top-level entry replaces the one of the same name in ``path``
    (others are kept); ``mode="replace"``: ``path`` is replaced as a whole. On failure nothing new is left behind.
    """
    if mode not in ("merge", "replace"):
        raise ValueError(f"mode must be 'merge' or 'replace', got {mode!r}")
    path = Path(path)
    check_output_dir(path)
    created = _make_parents(path.parent, path)
    inside = mode == "merge" and path.is_dir()  # stage in the target: same filesystem, even for a mount point
    _remove_stale_partials(path, inside)
    staging = _partial_name(path, inside)
    _remove(staging)
    try:
        staging.mkdir()
    except OSError as err:
        _remove_dirs(created)
        raise output_error(path, err) from err
    try:
        yield staging
        _commit_directory(staging, path, mode)
    except BaseException as err:
        full = isinstance(err, OSError) and is_disk_full(staging)
        _remove(staging)
        _remove_dirs(created)
        if full and not isinstance(err, OutputPathError):
            raise output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from err
        if isinstance(err, OutputPathError):  # raised by a nested writer: name the final path, not the staging one
            rel = _relative(err.filename, staging)
            if rel is not None:
                raise OutputPathError(path / rel, err.problem, err.fix, err.errno) from err
        elif isinstance(err, OSError):
            translated = _translate(err, staging, path)
            if translated is not err:
                raise translated from err
        raise


def _commit_directory(staging: Path, path: Path, mode: str) -> None:
    if not path.exists():
        os.replace(staging, path)
    elif mode == "replace":
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
        os.replace(staging, path)
        _remove(old)
    else:
        for entry in sorted(staging.iterdir()):
            final = path / entry.name
            if entry.is_dir() and final.is_dir():
                old = path / f".{entry.name}.old-{os.getpid()}"
                _remove(old)
                os.replace(final, old)
                os.replace(entry, final)
                _remove(old)
            else:
                if final.is_dir():
                    _remove(final)
                os.replace(entry, final)
        staging.rmdir()
    fsync_dir(path.parent)
    fsync_dir(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); return ``path``."""
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, data: Any, indent: int | None = 2, sort_keys: bool = False,
               default: Any = None) -> Path:
    """Write ``data`` as JSON (+ newline) to ``path`` atomically; return ``path``."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def save_npy(path: str | Path, array: Any) -> Path:
    """``np.save`` (never pickled: ``allow_pickle=False``) to ``path`` atomically; return ``path``."""
    import numpy as np

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)
        f.flush()
    return Path(path)


def save_image(path: str | Path, image: Any, format: str | None = None, **params: Any) -> Path:
    """Save a PIL image to ``path`` atomically (format from the suffix unless given); return ``path``."""
    path = Path(path)
    fmt = format or {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix.lstrip(".").upper() or "PNG")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format=fmt, **params)
        f.flush()
    return path


def save_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically; return ``path``."""
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        except SafetensorError as err:  # "... I/O error: No space left on device (os error 28)"
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from err
    return Path(path)


# ------------------------------------------------------------------------------------------- reading


def read_safetensors(path: str | Path, device: str = "cpu", fix: str = "re-export it, or retrain"
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a safetensors file -> ``(tensors, metadata)``. Never unpickles. A missing file raises
    ``FileNotFoundError``; a file that is not valid safetensors (truncated, a pickle, random bytes) raises
    ``ValueError``: "X is not a valid safetensors file (truncated, or not produced by onemodel); <fix>"."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a file"
        raise FileNotFoundError(f"{str(path)!r} {problem}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file (truncated, or not produced by onemodel); {fix}"
        ) from err
    return tensors, metadata
