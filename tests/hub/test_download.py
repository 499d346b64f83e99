"""ferry.hub.resolve and load_model against a fake Hub on loopback: what is fetched, the cache, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from huggingface_hub import constants

from ferry.hub import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    FileNotInRepoError,
    HubAuthError,
    HubOfflineError,
    RepoNotFoundError,
    resolve,
)
from ferry.loader import ModelNotFoundError, load_model, load_tokenizer
from hub.fake_hub import FakeHub, FakeRepo
from hub.tiny_gguf import write_tiny_gguf

LLAMA = "tiny-org/tiny-llama"
JUNK = {"pytorch_model.bin": b"\0" * 64, "onnx/model.onnx": b"onnx", "README.md": b"# tiny",
        "original/consolidated.00.pth": b"pth"}


@pytest.fixture
def llama_repo(hub: FakeHub, tiny_llama_dir: Path) -> FakeRepo:
    repo = FakeRepo.from_folder(tiny_llama_dir)
    repo.files.update(JUNK)
    hub.repos[LLAMA] = repo
    return repo


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("tiny-gguf")
    return {"Tiny-Q8_0.gguf": write_tiny_gguf(folder / "q8.gguf", matrix_type=Q.Q8_0).read_bytes(),
            "Tiny-F32.gguf": write_tiny_gguf(folder / "f32.gguf").read_bytes()}


def test_safetensors_repo_fetches_only_what_ferry_reads_and_generates_as_the_folder(
        hub: FakeHub, llama_repo: FakeRepo, tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ferry.engine.llm_engine import LLM
    from ferry.sampling_params import SamplingParams

    with caplog.at_level(logging.INFO, logger="ferry.hub"):
        folder = resolve(LLAMA)
    expected = {f for f in llama_repo.files if f in (*CONFIG_FILES, *TOKENIZER_FILES) or f.endswith(".safetensors")}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= expected
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == expected
    assert sorted(hub.fetched()) == sorted(expected)
    assert folder == Path(constants.HF_HUB_CACHE).resolve() / "models--tiny-org--tiny-llama" / "snapshots" / llama_repo.commit
    # off a terminal: one log line per downloaded file, with its size
    size = len(llama_repo.files["model.safetensors"]) / 2**20
    assert f"downloading {LLAMA}/model.safetensors ({size:.1f} MiB)" in caplog.messages

    params = SamplingParams(max_tokens=8, temperature=0.0)
    from_hub = LLM(LLAMA, device="cpu", kv_cache_memory=1 << 20)
    local = LLM(str(tiny_llama_dir), device="cpu", kv_cache_memory=1 << 20)
    assert from_hub.engine.model_name == LLAMA
    got = from_hub.generate(["The capital of France is"], params)[0].outputs[0].token_ids
    want = local.generate(["The capital of France is"], params)[0].outputs[0].token_ids
    assert list(got) == list(want) and len(got) == 8


def test_cache_hit_needs_no_network(hub: FakeHub, llama_repo: FakeRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = resolve(LLAMA)
    requests = len(hub.log)
    assert resolve(LLAMA) == folder  # online: one listing call, no file request
    assert [e.path for e in hub.log[requests:]] == [f"/api/models/{LLAMA}/revision/main"]
    hub.stop()
    assert resolve(LLAMA) == folder  # the Hub is unreachable (connection refused), no offline flag
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve(LLAMA) == folder
    assert load_model(LLAMA).arch.num_hidden_layers == 2


def test_offline_with_nothing_cached(hub: FakeHub, llama_repo: FakeRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = Path(constants.HF_HUB_CACHE).resolve()
    message = (f"HF_HUB_OFFLINE is set and '{LLAMA}' is not in the cache ({cache}); "
               f"unset it or run `ferry pull {LLAMA}` with network access")
    with pytest.raises(HubOfflineError) as err:
        resolve(LLAMA)
    assert str(err.value) == message
    with pytest.raises(ModelNotFoundError) as err2:
        load_model(LLAMA)
    assert str(err2.value) == message and isinstance(err2.value.__cause__, HubOfflineError)
    assert hub.log == []


def test_unreachable_hub_with_nothing_cached(hub: FakeHub, llama_repo: FakeRepo) -> None:
    hub.stop()
    with pytest.raises(HubOfflineError, match=rf"^cannot reach the Hub at {hub.url} and '{LLAMA}' is not in the "
                                              r"cache \(.*\): ConnectError"):
        resolve(LLAMA)


def test_gated_repo_asks_for_a_token_and_sends_hf_token(hub: FakeHub, llama_repo: FakeRepo,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    llama_repo.token, llama_repo.gated = "hf_fake_secret", True
    with pytest.raises(HubAuthError) as err:
        resolve(LLAMA)
    assert str(err.value) == (f"'{LLAMA}' is a gated repo: accept its terms at {hub.url}/{LLAMA} and set HF_TOKEN "
                              "or run `hf auth login` (`huggingface-cli login`)")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_secret")
    assert (resolve(LLAMA) / "model.safetensors").is_file()
    hub_requests = [e for e in hub.log if not e.path.startswith("/cdn/")]
    authorized = [e for e in hub_requests if e.authorization == "Bearer hf_fake_secret"]
    assert len(authorized) == len(hub_requests) - 1  # all but the first, refused, listing call


def test_private_repo_without_token(hub: FakeHub, llama_repo: FakeRepo) -> None:
    llama_repo.token = "hf_fake_secret"
    with pytest.raises(HubAuthError) as err:
        resolve(LLAMA)
    assert str(err.value) == (f"repo '{LLAMA}' not found or private (401: no token was sent); if it is private or "
                              "gated, set HF_TOKEN or run `hf auth login` (`huggingface-cli login`)")


def test_unknown_repo_and_revision(hub: FakeHub, llama_repo: FakeRepo) -> None:
    with pytest.raises(RepoNotFoundError) as err:
        resolve("tiny-org/nope")
    assert str(err.value) == f"repo 'tiny-org/nope' not found on the Hugging Face Hub ({hub.url})"
    with pytest.raises(ModelNotFoundError, match="^repo 'tiny-org/nope' not found"):
        load_model("tiny-org/nope")
    with pytest.raises(RepoNotFoundError, match=f"^revision 'v9' of '{LLAMA}' not found on the Hub$"):
        resolve(LLAMA, revision="v9")


def test_pinned_revision_and_download_dir(hub: FakeHub, llama_repo: FakeRepo, tmp_path: Path) -> None:
    folder = resolve(LLAMA, revision=llama_repo.commit, download_dir=str(tmp_path / "models"))
    assert folder == (tmp_path / "models").resolve() / "models--tiny-org--tiny-llama" / "snapshots" / llama_repo.commit
    assert not Path(constants.HF_HUB_CACHE).exists()


def test_tokenizer_only(hub: FakeHub, llama_repo: FakeRepo, tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(LLAMA)
    assert tok.encode("hello world") == load_model(str(tiny_llama_dir)).tokenizer.encode("hello world")
    assert "tokenizer.json" in hub.fetched()
    assert not any(name.endswith(".safetensors") or name == "config.json" for name in hub.fetched())


def test_quant_tag_downloads_only_that_quant(hub: FakeHub, tiny_ggufs: dict[str, bytes]) -> None:
    hub.repos["tiny-org/Tiny-GGUF"] = FakeRepo({**tiny_ggufs, "README.md": b"# tiny", "config.json": b"{}"})
    path = resolve("tiny-org/Tiny-GGUF:q8_0")
    assert path.name == "Tiny-Q8_0.gguf" and path.read_bytes() == tiny_ggufs["Tiny-Q8_0.gguf"]
    assert hub.fetched() == ["Tiny-Q8_0.gguf"]
    assert not any("F32" in e.path for e in hub.log)  # the other quant never hit the server
    loaded = load_model("tiny-org/Tiny-GGUF:Q8_0")
    assert loaded.name == "tiny-org/Tiny-GGUF:Q8_0" and loaded.source == path  # the snapshot's link, not its blob
    assert resolve("tiny-org/Tiny-GGUF", gguf_file="Tiny-F32.gguf").name == "Tiny-F32.gguf"


def test_unknown_quant_lists_the_available_ones(hub: FakeHub, tiny_ggufs: dict[str, bytes]) -> None:
    hub.repos["tiny-org/Tiny-GGUF"] = FakeRepo(dict(tiny_ggufs))
    with pytest.raises(FileNotInRepoError) as err:
        resolve("tiny-org/Tiny-GGUF:Q4_K_M")
    assert str(err.value) == "no file of 'tiny-org/Tiny-GGUF' matches the quant 'Q4_K_M'; available: F32, Q8_0"
    with pytest.raises(ModelNotFoundError, match="available: F32, Q8_0$"):
        load_model("tiny-org/Tiny-GGUF:Q4_K_M")
    assert hub.fetched() == []


def test_split_gguf_downloads_every_shard_and_returns_the_first(hub: FakeHub) -> None:
    shards = {f"Big-Q4_0-{i:05d}-of-00003.gguf": bytes([i]) * (1000 + i) for i in (1, 2, 3)}
    hub.repos["tiny-org/Big-GGUF"] = FakeRepo({**shards, "Big-Q8_0.gguf": b"q8" * 100})
    path = resolve("tiny-org/Big-GGUF:Q4_0")
    assert path.name == "Big-Q4_0-00001-of-00003.gguf"
    assert sorted(hub.fetched()) == sorted(shards)
    for name, data in shards.items():
        assert (path.parent / name).read_bytes() == data
