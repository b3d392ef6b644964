"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread is faster than several, by far on a busy machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- output-path faults (tests/test_io_atomic.py, tests/test_bad_inputs.py)


def _mount_tmpfs(path, options):
    """Mount a tiny tmpfs at ``path`` (root with CAP_SYS_ADMIN only); True on success."""
    import os
    import subprocess

    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def _umount(path):
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def full_dir(tmp_path, monkeypatch):
    """A directory on a full filesystem: a 64 KiB tmpfs, filled up, when the test can mount one; else a plain
    directory that ``tokenizers_mm.io_atomic`` sees as full (a mocked ENOSPC, caught by its up-front check)."""
    import os

    target = tmp_path / "full"
    if _mount_tmpfs(target, "size=64k"):
        filler = target / "filler"
        try:
            try:  # fill it up
                with open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * 4096)
                        f.flush()
            except OSError:
                pass
            # leave 16 KiB: small writes succeed, bigger ones fail half-way (the write path, not the up-front check)
            os.truncate(filler, max(0, filler.stat().st_size - 16384))
            yield target
        finally:
            _umount(target)
        return
    from tokenizers_mm import io_atomic

    target.mkdir()
    monkeypatch.setattr(io_atomic, "is_disk_full", lambda directory: str(target) in str(directory))
    yield target


@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only directory: a read-only tmpfs when the test can mount one (root ignores chmod), else chmod 555."""
    import os

    target = tmp_path / "ro"
    if _mount_tmpfs(target, "ro,size=16k"):
        try:
            yield target
        finally:
            _umount(target)
        return
    target.mkdir()
    os.chmod(target, 0o555)
    if os.access(target, os.W_OK):
        pytest.skip("cannot make a read-only directory here (root without mount)")
    yield target
    os.chmod(target, 0o755)
