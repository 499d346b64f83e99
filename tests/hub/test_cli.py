"""`ferry pull | models | rm | plan --model org/repo | generate --model org/repo | --version`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from ferry.cli import main
from ferry.version import __version__
from hub.conftest import subprocess_env
from hub.fake_hub import FakeHub, FakeRepo

LLAMA = "tiny-org/tiny-llama"


@pytest.fixture
def gguf_repo(hub: FakeHub) -> FakeRepo:
    shards = {f"Big-Q4_0-{i:05d}-of-00002.gguf": bytes([i]) * 3000 for i in (1, 2)}
    repo = FakeRepo({**shards, "Big-Q8_0.gguf": b"8" * 5000, "README.md": b"# big"})
    hub.repos["tiny-org/Big-GGUF"] = repo
    return repo


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"ferry {__version__}\n"


def test_pull_models_rm(hub: FakeHub, gguf_repo: FakeRepo, capsys: pytest.CaptureFixture[str]) -> None:
    cache = Path(constants.HF_HUB_CACHE).resolve()
    snapshot = cache / "models--tiny-org--Big-GGUF" / "snapshots" / gguf_repo.commit
    assert main(["pull", "tiny-org/Big-GGUF:Q4_0"]) == 0
    assert capsys.readouterr().out == f"{snapshot / 'Big-Q4_0-00001-of-00002.gguf'}\n"
    assert main(["pull", "tiny-org/Big-GGUF", "--gguf-file", "Big-Q8_0.gguf"]) == 0
    assert capsys.readouterr().out == f"{snapshot / 'Big-Q8_0.gguf'}\n"

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"Hugging Face Hub models in {cache}:" in out
    lines = out.splitlines()
    repo_line = next(line for line in lines if line.strip().startswith("tiny-org/Big-GGUF "))
    assert repo_line.split()[1:] == ["10.7", "KiB"]  # 2 x 3000 + 5000 bytes
    assert any(line.split()[:3] == ["tiny-org/Big-GGUF:Q4_0", "5.9", "KiB"]
               and line.endswith("Big-Q4_0-00001-of-00002.gguf (+1 shards)") for line in lines)
    assert any(line.split()[:3] == ["tiny-org/Big-GGUF:Q8_0", "4.9", "KiB"] for line in lines)
    assert "smollm2-135m-instruct" in out

    assert main(["rm", "tiny-org/Big-GGUF:q4_0"]) == 0
    assert capsys.readouterr().out == ("removed tiny-org/Big-GGUF (Big-Q4_0-00001-of-00002.gguf, "
                                       "Big-Q4_0-00002-of-00002.gguf): freed 5.9 KiB\n")
    assert sorted(p.name for p in snapshot.iterdir()) == ["Big-Q8_0.gguf"]
    assert main(["rm", "tiny-org/Big-GGUF:Q4_0"]) == 2
    assert capsys.readouterr().err == ("ferry rm: error: no file of 'tiny-org/Big-GGUF' matches the quant 'Q4_0'; "
                                       "available: Q8_0 (in the cache)\n")
    assert main(["rm", "tiny-org/Big-GGUF"]) == 0
    assert capsys.readouterr().out == "removed tiny-org/Big-GGUF (the whole repo): freed 4.9 KiB\n"
    assert not (cache / "models--tiny-org--Big-GGUF").exists()
    assert main(["rm", "tiny-org/Big-GGUF"]) == 2
    assert capsys.readouterr().err == f"ferry rm: error: 'tiny-org/Big-GGUF' is not in the cache ({cache})\n"


def test_pull_errors_are_one_line_exit_2(hub: FakeHub, gguf_repo: FakeRepo,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "tiny-org/Big-GGUF:Q5_K_M"]) == 2
    assert capsys.readouterr().err == ("ferry pull: error: no file of 'tiny-org/Big-GGUF' matches the quant "
                                       "'Q5_K_M'; available: Q4_0, Q8_0\n")
    assert main(["pull", "tiny-org/nope"]) == 2
    assert capsys.readouterr().err == f"ferry pull: error: repo 'tiny-org/nope' not found on the Hugging Face Hub ({hub.url})\n"
    assert main(["pull", "tiny-org/Big-GGUF"]) == 2  # neither one quant nor a Q4_K_M
    assert capsys.readouterr().err.startswith("ferry pull: error: 'tiny-org/Big-GGUF' has several quants: Q4_0, Q8_0")


def test_pull_in_a_subprocess_uses_the_environment(hub: FakeHub, hf_home: Path, tiny_llama_dir: Path,
                                                   tmp_path: Path) -> None:
    hub.repos[LLAMA] = FakeRepo.from_folder(tiny_llama_dir)
    download_dir = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "ferry.cli", "pull", LLAMA, "--download-dir", str(download_dir)],
                          env=subprocess_env(hub, hf_home), capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder.parent.parent == download_dir.resolve() / "models--tiny-org--tiny-llama"
    assert (folder / "model.safetensors").is_file()
    assert f"downloading {LLAMA}/model.safetensors (" in done.stderr  # a log line per file off a terminal
    assert "Traceback" not in done.stderr


def test_plan_reads_only_config_json(hub: FakeHub, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[LLAMA] = FakeRepo.from_folder(tiny_llama_dir)
    assert main(["plan", "--model", LLAMA, "--gpu", "cpu", "--rps", "1", "--prompt-tokens", "200",
                 "--output-tokens", "100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert hub.fetched() == ["config.json"]
    text = json.dumps(plan)
    assert "tiny-llama" in text
    assert main(["plan", "--model", str(tiny_llama_dir), "--gpu", "cpu", "--rps", "1", "--prompt-tokens", "200",
                 "--output-tokens", "100", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert len(_numbers(plan)) > 10 and _numbers(plan) == _numbers(local)  # same shape, same figures


def test_plan_of_a_gguf_quant_fetches_that_file_only(hub: FakeHub, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from gguf import GGMLQuantizationType as Q

    from hub.tiny_gguf import write_tiny_gguf

    q8 = write_tiny_gguf(tmp_path / "q8.gguf", matrix_type=Q.Q8_0)
    hub.repos["tiny-org/Tiny-GGUF"] = FakeRepo({"Tiny-Q8_0.gguf": q8.read_bytes(),
                                                "Tiny-F32.gguf": write_tiny_gguf(tmp_path / "f32.gguf").read_bytes()})
    argv = ["--gpu", "cpu", "--rps", "1", "--prompt-tokens", "100", "--output-tokens", "50", "--json"]
    assert main(["plan", "--model", "tiny-org/Tiny-GGUF:Q8_0", *argv]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert hub.fetched() == ["Tiny-Q8_0.gguf"]
    assert main(["plan", "--model", str(q8), *argv]) == 0
    assert _numbers(plan) == _numbers(json.loads(capsys.readouterr().out))


def _numbers(value: object) -> list[float]:
    if isinstance(value, dict):
        return [n for k in sorted(value) if k not in ("source", "name") for n in _numbers(value[k])]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_generate_with_a_repo_id(hub: FakeHub, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.repos[LLAMA] = FakeRepo.from_folder(tiny_llama_dir)
    argv = ["--raw", "--max-tokens", "4", "--device", "cpu", "--kv-cache-memory", str(1 << 20)]
    assert main(["generate", "Hello", "--model", LLAMA, *argv]) == 0
    from_hub = capsys.readouterr().out
    assert main(["generate", "Hello", "--model", str(tiny_llama_dir), *argv]) == 0
    assert capsys.readouterr().out == from_hub
    assert main(["generate", "Hello", "--model", "tiny-org/nope", *argv]) == 2
    assert capsys.readouterr().err == (f"ferry generate: error: repo 'tiny-org/nope' not found on the Hugging Face "
                                       f"Hub ({hub.url})\n")
