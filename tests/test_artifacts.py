"""Artifacts keyed by config: reuse, separation by config, corruption detection."""

import pytest

from companion.artifacts import artifact_path, cached_artifact, config_key, verify_artifact


def build_counter(calls):
    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"\x00\x01" * 10)
        (folder / "config.json").write_text("{}")
    return build


def test_built_once_then_loaded(tmp_path):
    calls = []
    first = cached_artifact(tmp_path, "enc", {"a": 1}, build_counter(calls), log=None)
    second = cached_artifact(tmp_path, "enc", {"a": 1}, build_counter(calls), log=None)
    assert first == second and len(calls) == 1 and verify_artifact(first) is None


def test_config_separates_and_key_order_does_not(tmp_path):
    assert config_key({"a": 1, "b": 2}) == config_key({"b": 2, "a": 1})
    assert artifact_path(tmp_path, "x", {"a": 1}) != artifact_path(tmp_path, "x", {"a": 2})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        config_key({"a": object()})


def test_corrupted_artifact_is_rebuilt(tmp_path):
    calls = []
    folder = cached_artifact(tmp_path, "enc", {"a": 1}, build_counter(calls), log=None)
    (folder / "weights.bin").write_bytes(b"garbage")
    assert "checksum differs" in verify_artifact(folder)
    with pytest.warns(UserWarning, match="discarding a broken cached artifact"):
        again = cached_artifact(tmp_path, "enc", {"a": 1}, build_counter(calls), log=None)
    assert len(calls) == 2 and (again / "weights.bin").read_bytes() == b"\x00\x01" * 10


def test_half_written_artifact_is_rebuilt(tmp_path):
    folder = artifact_path(tmp_path, "enc", {"a": 1})
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"partial")  # no manifest: an interrupted build
    calls = []
    with pytest.warns(UserWarning, match="missing"):
        cached_artifact(tmp_path, "enc", {"a": 1}, build_counter(calls), log=None)
    assert len(calls) == 1 and verify_artifact(folder) is None


def test_failed_build_leaves_nothing(tmp_path):
    def broken(folder):
        (folder / "w").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cached_artifact(tmp_path, "enc", {"a": 1}, broken, log=None)
    assert list(tmp_path.iterdir()) == []
