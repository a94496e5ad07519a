"""climax.storage, the one storage layer: atomic writes (files and folders), option mapping."""

from __future__ import annotations

import pytest

from climax import storage


def test_atomic_path_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "f.bin"
    storage.write_bytes(target, b"old", tag="owner")
    with pytest.raises(RuntimeError), storage.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["f.bin"]
    with storage.atomic_path(target, durable=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".f.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_path_swaps_a_folder_in_whole(tmp_path):
    store = tmp_path / "x.zarr"
    for value in ("1", "2"):
        with storage.atomic_path(store) as tmp:
            tmp.mkdir()
            (tmp / "v").write_text(value)
        assert (store / "v").read_text() == value and [p.name for p in tmp_path.iterdir()] == ["x.zarr"]


def test_options_and_pyarrow_mapping(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    assert storage.storage_options_for("s3://b/k")["client_kwargs"] == {"endpoint_url": "http://env:9000"}
    assert storage.storage_options_for("gs://b/k") == {"token": "anon"}
    assert storage.storage_options_for("gs://b/k", anonymous_gcs=False) == {}
    kw = storage.arrow_s3_kwargs({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:1"}})
    assert kw == {"endpoint_override": "h:1", "scheme": "http", "access_key": "k", "secret_key": "s",
                  "region": "us-east-1"}
    assert storage.arrow_s3_kwargs({"key": "k", "config_kwargs": {}}) is None
    assert storage.arrow_s3_kwargs({"key": "k", "config_kwargs": {}}, strict=False)["access_key"] == "k"
    fs, path = storage.filesystem("file:///tmp/x")
    assert path == "/tmp/x" and not storage.is_remote("file:///tmp/x") and storage.is_remote("s3://b/k")
