import os
import stat

import pytest

from stablenet.atomic import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    assert path.read_bytes() == b"one"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    os.chmod(path, 0o640)
    atomic_write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    from stablenet.atomic import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
