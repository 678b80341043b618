"""Where the Fashion-MNIST asset is looked for, in which order, and what happens when it is absent."""

from __future__ import annotations

import pytest

from kdforge.assets import fashion_mnist
from kdforge.data.vision import write_synthetic_fashion_mnist as write_fake_fashion_mnist
from kdforge.errors import AssetError


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)


def test_env_var_folder_wins_over_system_folder(tmp_path, monkeypatch):
    env_dir = write_fake_fashion_mnist(tmp_path / "env")
    system = write_fake_fashion_mnist(tmp_path / "sys")
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(env_dir))
    assert fashion_mnist.ensure(tmp_path / "cache", system_dir=system) == env_dir


def test_incomplete_env_var_folder_raises_naming_missing_file(tmp_path, monkeypatch):
    folder = write_fake_fashion_mnist(tmp_path / "env")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(folder))
    with pytest.raises(AssetError, match="train-images-idx3-ubyte"):
        fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere")


def test_system_folder_used_when_complete(tmp_path):
    system = write_fake_fashion_mnist(tmp_path / "sys", compress=False)
    assert fashion_mnist.ensure(tmp_path / "cache", system_dir=system, allow_install=False) == system


def test_previous_download_in_cache_is_reused(tmp_path):
    cached = write_fake_fashion_mnist(tmp_path / "cache" / "fashion-mnist")
    got = fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere", allow_install=False, allow_download=False)
    assert got == cached


def test_nothing_available_raises_with_install_commands(tmp_path):
    with pytest.raises(AssetError) as info:
        fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere", allow_install=False, allow_download=False)
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    assert fashion_mnist.ENV_VAR in str(info.value)


def test_apt_install_is_attempted_and_failure_reported(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fashion_mnist, "_apt_install", lambda: calls.append("apt") or "apt-get not available")
    with pytest.raises(AssetError, match="apt-get not available"):
        fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere", allow_download=False)
    assert calls == ["apt"]


def test_successful_install_returns_system_folder(tmp_path, monkeypatch):
    system = tmp_path / "sys"
    monkeypatch.setattr(fashion_mnist, "_apt_install", lambda: write_fake_fashion_mnist(system) and None)
    system.mkdir()
    assert fashion_mnist.ensure(tmp_path / "cache", system_dir=system, allow_download=False) == system


def test_download_failure_is_reported_not_raised_raw(tmp_path, monkeypatch):
    def refuse(url, timeout):
        raise OSError("network unreachable")

    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", refuse)
    with pytest.raises(AssetError, match="network unreachable"):
        fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere", allow_install=False)


def test_download_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return b"not the real file"

    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", lambda url, timeout: Response())
    with pytest.raises(AssetError, match="expected 8d4fb7e6"):
        fashion_mnist.ensure(tmp_path / "cache", system_dir=tmp_path / "nowhere", allow_install=False)
    assert not (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
