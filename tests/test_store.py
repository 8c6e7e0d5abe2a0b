"""The blob store on a real filesystem: layout, hashing, atomic materialise, refusals."""

from __future__ import annotations

import os
import stat

import pytest

from lorad._atomic import temp_name
from lorad.errors import StoreError
from lorad.library.store import CorruptBlob, FileStamp, Store, TargetChanged
from tests._store_fixtures import make_lora, sha256_of


@pytest.fixture
def lora(tmp_path):
    return make_lora(tmp_path / "loras" / "style.safetensors")


def test_ingest_lays_out_a_read_only_blob_named_by_its_sha256(tmp_path, lora):
    store = Store(tmp_path / "state")
    info = store.ingest(lora, data_offset=8)
    expected = sha256_of(lora)
    assert info.sha256 == expected and info.bytes == lora.stat().st_size
    blob = tmp_path / "state" / "objects" / "sha256" / expected[:2] / expected
    assert store.path_of(expected) == blob
    assert blob.read_bytes() == lora.read_bytes()
    assert stat.S_IMODE(blob.stat().st_mode) == 0o400  # private: the state is no one else's to read
    assert list(store.blobs()) == [expected]
    assert store.temp_files() == []  # the temp copy was renamed, not left behind


def test_ingest_hashes_the_data_section_in_the_same_pass(tmp_path, lora):
    from lorad.engine.formats.safetensors_file import file_data_sha256, read_header

    header = read_header(lora)
    info = Store(tmp_path / "state").ingest(lora, data_offset=header.data_offset)
    assert info.data_sha256 == file_data_sha256(lora)


def test_ingest_twice_stores_one_blob(tmp_path, lora):
    store = Store(tmp_path / "state")
    a = store.ingest(lora)
    b = store.ingest(lora)
    assert a == b and list(store.blobs()) == [a.sha256]


def test_ingest_replaces_a_damaged_copy_and_keeps_it_in_bad(tmp_path, lora):
    store = Store(tmp_path / "state")
    sha = store.ingest(lora).sha256
    blob = store.path_of(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"rotten")
    assert not store.is_intact(sha)
    store.ingest(lora)
    assert store.is_intact(sha)
    assert [p.read_bytes() for p in store.bad.iterdir()] == [b"rotten"]


def test_ingest_refuses_bytes_that_do_not_hash_as_expected(tmp_path, lora):
    store = Store(tmp_path / "state")
    with pytest.raises(StoreError, match="expected 000000000000; not stored"):
        store.ingest(lora, expect_sha256="0" * 64)
    assert list(store.blobs()) == [] and store.temp_files() == []


def test_ingest_of_a_missing_file_is_one_clear_error(tmp_path):
    store = Store(tmp_path / "state")
    with pytest.raises(StoreError, match="cannot store .*gone.safetensors: No such file"):
        store.ingest(tmp_path / "gone.safetensors")
    assert store.temp_files() == []


def test_materialize_replaces_the_target_keeping_its_mode(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="copy")
    other = make_lora(tmp_path / "other.safetensors", seed=9)
    sha = store.ingest(other).sha256
    os.chmod(lora, 0o640)
    inode_before = lora.stat().st_ino
    store.materialize(sha, lora)
    assert sha256_of(lora) == sha
    assert stat.S_IMODE(lora.stat().st_mode) == 0o640
    assert lora.stat().st_ino != inode_before  # renamed over, not written in place
    assert lora.stat().st_ino != store.path_of(sha).stat().st_ino  # a copy, not a link
    assert not temp_name(lora).exists()


def test_materialize_to_a_new_path_follows_the_umask_without_changing_it(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="copy")
    sha = store.ingest(lora).sha256
    old = os.umask(0o027)
    try:
        store.materialize(sha, tmp_path / "new.safetensors")
        assert os.umask(0o027) == 0o027  # read, never reset along the way
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.safetensors").stat().st_mode) == 0o640


def test_reflink_or_copy_yields_the_blob_bytes(tmp_path, lora):
    store = Store(tmp_path / "state")  # default: reflink where the filesystem can, else copy
    sha = store.ingest(make_lora(tmp_path / "other.safetensors", seed=3)).sha256
    store.materialize(sha, lora)
    assert lora.read_bytes() == store.path_of(sha).read_bytes()


def test_hardlink_mode_shares_the_inode(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="hardlink")
    sha = store.ingest(make_lora(tmp_path / "other.safetensors", seed=4)).sha256
    store.materialize(sha, lora)
    assert lora.stat().st_ino == store.path_of(sha).stat().st_ino


def test_materialize_refuses_a_corrupt_blob_and_leaves_the_target(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="copy")
    sha = store.ingest(make_lora(tmp_path / "other.safetensors", seed=5)).sha256
    blob = store.path_of(sha)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = lora.read_bytes()
    with pytest.raises(CorruptBlob, match=f"blob {sha[:12]} is corrupt"):
        store.materialize(sha, lora)
    assert lora.read_bytes() == before
    assert not temp_name(lora).exists()


def test_materialize_leaves_a_target_that_changed_since_it_was_checked(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="copy")
    sha = store.ingest(make_lora(tmp_path / "other.safetensors", seed=6)).sha256
    stamp = FileStamp.of(lora.stat())
    lora.write_bytes(lora.read_bytes() + b"")  # rewritten by someone else: new mtime
    os.utime(lora, ns=(stamp.mtime_ns + 10**9, stamp.mtime_ns + 10**9))
    before = lora.read_bytes()
    with pytest.raises(TargetChanged, match="changed while lorad was replacing it"):
        store.materialize(sha, lora, expect=stamp)
    assert lora.read_bytes() == before and not temp_name(lora).exists()


def test_materialize_removes_a_stale_temp_left_by_a_crash(tmp_path, lora):
    store = Store(tmp_path / "state", link_mode="copy")
    sha = store.ingest(make_lora(tmp_path / "other.safetensors", seed=7)).sha256
    temp_name(lora).write_bytes(b"half a file")
    store.materialize(sha, lora)
    assert sha256_of(lora) == sha and not temp_name(lora).exists()


def test_unknown_link_mode_and_bad_digest_are_refused(tmp_path):
    with pytest.raises(StoreError, match="unknown link mode 'symlink'"):
        Store(tmp_path / "state", link_mode="symlink")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="not a sha256 hex digest"):
        Store(tmp_path / "state").path_of("../../etc/passwd")


def test_quarantine_and_remove(tmp_path, lora):
    store = Store(tmp_path / "state")
    sha = store.ingest(lora).sha256
    moved = store.quarantine(sha)
    assert moved.parent == store.bad and moved.read_bytes() == lora.read_bytes()
    assert not store.has(sha)
    sha = store.ingest(lora).sha256
    store.remove(sha)
    assert list(store.blobs()) == []
