"""Repo ids and file selection: quant tags, shards, projector files, safetensors sets (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.hub import (
    AmbiguousFileError,
    FileNotInRepoError,
    HubError,
    is_repo_id,
    parse_ref,
)
from ferry.hub.files import (
    gguf_quants,
    is_gguf_repo,
    safetensors_metadata_files,
    safetensors_weight_files,
    select_gguf,
)

GGUF_REPO = ["README.md", ".gitattributes", "Llama-3.2-3B-Instruct-Q4_K_M.gguf", "Llama-3.2-3B-Instruct-Q4_K_S.gguf",
             "Llama-3.2-3B-Instruct-Q8_0.gguf", "Llama-3.2-3B-Instruct-IQ4_XS.gguf", "mmproj-model-f16.gguf",
             "Q2_K/Llama-3.2-3B-Instruct-Q2_K-00002-of-00002.gguf",
             "Q2_K/Llama-3.2-3B-Instruct-Q2_K-00001-of-00002.gguf"]


@pytest.mark.parametrize(("text", "expected"), [
    ("Qwen/Qwen2.5-1.5B-Instruct", True), ("bartowski/Llama-3.2-3B-Instruct-GGUF:Q4_K_M", True),
    ("org/repo:model-q8_0.gguf", True), ("smollm2-135m-instruct", False), ("a/b/c", False),
    ("/abs/path", False), ("./org/name", False), ("org/-bad", False), ("org/na--me", False), ("", False)])
def test_is_repo_id(text: str, expected: bool) -> None:
    assert is_repo_id(text) is expected


def test_an_existing_local_path_is_not_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("org/name")


def test_parse_ref() -> None:
    ref = parse_ref("bartowski/Llama-3.2-3B-Instruct-GGUF:q4_k_m")
    assert (ref.repo_id, ref.tag, str(ref)) == ("bartowski/Llama-3.2-3B-Instruct-GGUF", "q4_k_m",
                                                "bartowski/Llama-3.2-3B-Instruct-GGUF:q4_k_m")
    with pytest.raises(HubError, match="not a Hugging Face repo id"):
        parse_ref("no-slash")


def test_quants_group_shards_and_leave_out_the_projector() -> None:
    quants = {q.label: q.files for q in gguf_quants(GGUF_REPO)}
    assert quants == {
        "Q4_K_M": ("Llama-3.2-3B-Instruct-Q4_K_M.gguf",), "Q4_K_S": ("Llama-3.2-3B-Instruct-Q4_K_S.gguf",),
        "Q8_0": ("Llama-3.2-3B-Instruct-Q8_0.gguf",), "IQ4_XS": ("Llama-3.2-3B-Instruct-IQ4_XS.gguf",),
        "Q2_K": ("Q2_K/Llama-3.2-3B-Instruct-Q2_K-00001-of-00002.gguf",
                 "Q2_K/Llama-3.2-3B-Instruct-Q2_K-00002-of-00002.gguf")}


@pytest.mark.parametrize(("tag", "first"), [
    ("Q4_K_M", "Llama-3.2-3B-Instruct-Q4_K_M.gguf"), ("q4_k_m", "Llama-3.2-3B-Instruct-Q4_K_M.gguf"),
    ("iq4_xs", "Llama-3.2-3B-Instruct-IQ4_XS.gguf"), ("Q2_K", "Q2_K/Llama-3.2-3B-Instruct-Q2_K-00001-of-00002.gguf"),
    ("Llama-3.2-3B-Instruct-Q8_0.gguf", "Llama-3.2-3B-Instruct-Q8_0.gguf"), (None, "Llama-3.2-3B-Instruct-Q4_K_M.gguf")])
def test_select_by_tag(tag: str | None, first: str) -> None:
    assert select_gguf("org/r", GGUF_REPO, tag).first == first


def test_a_tag_is_a_whole_token_not_a_prefix() -> None:
    with pytest.raises(FileNotInRepoError) as err:
        select_gguf("org/r", GGUF_REPO, "Q4_K")
    assert str(err.value) == ("no file of 'org/r' matches the quant 'Q4_K'; "
                              "available: IQ4_XS, Q4_K_M, Q4_K_S, Q8_0, Q2_K")


def test_several_matches_are_listed() -> None:
    files = ["m-Q4_K_M.gguf", "m-UD-Q4_K_M.gguf", "m-Q8_0.gguf"]
    with pytest.raises(AmbiguousFileError, match="matches several files: m-Q4_K_M.gguf, m-UD-Q4_K_M.gguf"):
        select_gguf("org/r", files, "Q4_K_M")
    with pytest.raises(AmbiguousFileError, match="several quants: Q4_K_S, Q8_0; pick one as org/r:QUANT"):
        select_gguf("org/r", ["m-Q4_K_S.gguf", "m-Q8_0.gguf"])


def test_explicit_file_of_a_split_quant_selects_every_shard() -> None:
    quant = select_gguf("org/r", GGUF_REPO, gguf_file="Llama-3.2-3B-Instruct-Q2_K-00002-of-00002.gguf")
    assert quant.first.endswith("-00001-of-00002.gguf") and len(quant.files) == 2
    with pytest.raises(FileNotInRepoError, match="has no GGUF file 'nope.gguf'"):
        select_gguf("org/r", GGUF_REPO, gguf_file="nope.gguf")


def test_an_incomplete_split_set_is_not_offered() -> None:
    assert gguf_quants(["m-Q2_K-00001-of-00003.gguf", "m-Q2_K-00003-of-00003.gguf", "m-Q8_0.gguf"]) \
        == gguf_quants(["m-Q8_0.gguf"])


def test_safetensors_selection() -> None:
    repo = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors",
            "model.safetensors.index.json", "pytorch_model.bin", "onnx/model.onnx", "original/consolidated.00.pth",
            "model-Q4_K_M.gguf"]
    assert not is_gguf_repo(repo, None, None) and is_gguf_repo(repo, "Q4_K_M", None)
    assert safetensors_metadata_files("o/r", repo) == ["config.json", "generation_config.json", "tokenizer.json",
                                                       "tokenizer_config.json", "model.safetensors.index.json"]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    assert safetensors_weight_files("o/r", repo, index) == ["model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"]
    assert safetensors_weight_files("o/r", ["model.safetensors", "consolidated.safetensors"], None) \
        == ["model.safetensors"]


def test_a_repo_with_only_pytorch_weights_says_so() -> None:
    with pytest.raises(FileNotInRepoError, match=r"no \.safetensors or \.gguf weights \(it has pytorch_model.bin\)"):
        safetensors_metadata_files("o/r", ["config.json", "pytorch_model.bin"])
