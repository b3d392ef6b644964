"""Corrupt token shards are skipped and counted (data.max_bad_fraction), and a killed training run takes its
DataLoader workers with it."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from training.loader import TokenShardSet
from training.pretokenize import _write_shard

REPO = Path(__file__).resolve().parents[1]


def _token_samples(start: int, n: int) -> list[dict]:
    return [{"__key__": f"s{i:04d}", "caption": np.arange(3, 9), "rgb": np.arange(300) + i}
            for i in range(start, start + n)]


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


@pytest.fixture
def token_dir(tmp_path) -> Path:
    """10 good shards x 4 samples, then: random bytes, a truncated copy of a good shard, a shard whose second sample
    has a pickled .npy member."""
    import tarfile

    d = tmp_path / "tokens" / "train"
    d.mkdir(parents=True)
    for k in range(10):
        _write_shard(d / f"shard-{k:06d}.tar", _token_samples(4 * k, 4))
    (d / "shard-000010.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    good = (d / "shard-000000.tar").read_bytes()
    (d / "shard-000011.tar").write_bytes(good[:2500])  # cut in the middle of the second sample's rgb.npy
    _write_shard(d / "shard-000012.tar", _token_samples(100, 2))
    with tarfile.open(d / "shard-000012.tar", "a") as tar:  # a third sample with a pickled member
        data = _pickled_npy()
        info = tarfile.TarInfo("s0999.rgb.npy")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return tmp_path / "tokens"


def test_corrupt_token_shards_are_skipped_and_counted(token_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="training.loader"):
        ts = TokenShardSet(token_dir, "train", max_bad_fraction=0.5)
    assert ts.stats.shards == 13 and ts.stats.bad_shards == 2 and ts.stats.bad_samples == 1
    # every readable sample is kept: 10 x 4 good, 2 of the pickle shard, those before the damage of the truncated one
    assert len(ts) == ts.stats.samples and 42 <= len(ts) < 46
    assert all(s["rgb"].dtype == np.int64 for s in ts.samples)
    messages = [r.getMessage() for r in caplog.records]
    assert any("shard-000010.tar" in m and "skipping corrupt shard" in m for m in messages)
    assert any("shard-000011.tar" in m for m in messages)
    pickled = [m for m in messages if "s0999" in m]
    assert pickled and "shard-000012.tar" in pickled[0] and "'rgb.npy'" in pickled[0]
    assert "pickled objects are never loaded" in pickled[0] and "allow_pickle" not in pickled[0]
    assert any("skipped 2 of 13 shard(s) and 1 of" in m for m in messages)


def test_too_much_corrupt_data_stops_with_one_line(token_dir):
    with pytest.raises(ValueError) as info:
        TokenShardSet(token_dir, "train")  # default max_bad_fraction 0.05: 2 of 13 shards is too many
    msg = str(info.value)
    assert "2 of 13 shard(s)" in msg and "data.max_bad_fraction=0.05" in msg and "regenerate the shards" in msg
    assert "\n" not in msg


def _tiny():
    from test_train import build_tiny_pipeline

    return build_tiny_pipeline()


def test_train_with_a_corrupt_token_shard(tmp_path, capsys):
    from onemodel.cli import main
    from test_train import tiny_overrides

    tiny = _tiny()
    tokens = tmp_path / "tokens"
    shutil.copytree(tiny / "tokens", tokens)
    (tokens / "train" / "shard-999999.tar").write_bytes(b"\x00garbage" * 300)
    overrides = [o if not o.startswith("data.sources=") else f"data.sources=[{{path: {tokens}}}]"
                 for o in tiny_overrides(tiny, tmp_path / "run", "optim.max_steps=2", "logging.eval_batches=1")]
    rc = main(["train", *overrides])  # 1 of 3 shards corrupt: above the default 5%
    assert rc == 2 and "data.max_bad_fraction=0.05" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["train", *overrides, f"checkpoint.out_dir={tmp_path / 'file'}", "data.max_bad_fraction=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exists and is a file, not a directory; remove it or choose another" in err
    assert "checkpoint.out_dir" in err
    from training.config import load_train_config
    from training.train import train

    summary = train(load_train_config(None, [*overrides, "data.max_bad_fraction=0.5"]))
    assert summary["skipped"] == {"shards": 1, "samples": 0} and summary["final_step"] == 2


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataloader_worker_dies_with_a_killed_trainer(tmp_path):
    from test_train import tiny_overrides

    tiny = _tiny()
    overrides = [o if o != "data.num_workers=0" else "data.num_workers=1"
                 for o in tiny_overrides(tiny, tmp_path / "run", "optim.max_steps=100000")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while not workers:
            assert proc.poll() is None, "training exited early"
            assert time.monotonic() < deadline, "no DataLoader worker appeared"
            time.sleep(0.2)
            workers = _children(proc.pid)
        time.sleep(1.0)  # let the worker run its init (prctl) and start producing batches
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone_by = time.monotonic() + 2.0  # torch's own watchdog alone needs up to ~5-8 s
        while any(_alive(w) for w in workers) and time.monotonic() < gone_by:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "a DataLoader worker outlived the killed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in _children(proc.pid):
            os.kill(w, signal.SIGKILL)


def test_checkpoint_on_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, full_dir, capsys):
    from onemodel.cli import main
    from test_train import tiny_overrides

    tiny = _tiny()
    run = full_dir / "run"
    rc = main(["train", *tiny_overrides(tiny, run, "optim.max_steps=2", "logging.eval_batches=1")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no space left on device; free some space or choose another directory" in err and str(run) in err
    leftovers = [p.name for p in run.rglob("*")] if run.exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp") or n.startswith("step_") or "partial" in n], leftovers
