"""`ferry models`, `ferry generate` and `ferry chat` through the real CLI entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ferry.cli import main


def test_models_lists_the_default_as_installed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "installed at" in out


def test_generate_prints_an_answer(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "What is the capital of France?", "--max-tokens", "24",
                 "--kv-cache-memory", str(32 << 20)]) == 0
    assert "Paris" in capsys.readouterr().out


def test_unknown_model_is_one_clear_line_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "Traceback" not in err


def test_chat_streams_answers_until_exit() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ferry.cli", "chat", "--max-tokens", "16",
         "--kv-cache-memory", str(32 << 20)],
        input="What is the capital of France?\n/exit\n", capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
