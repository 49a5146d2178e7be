"""Whole-model decode speed, batch 1: a MoPEQ bundle through mopeq_runtime vs llama.cpp Q2_K / Q3_K_M / Q4_K_M.

    . .venv/bin/activate
    mopeq-export build --model ../shared/models/text-moe --target cpu --avg-bits 2.5 --method rtn \
        --calib ../shared/data/text_calib.txt --out /root/bench/text-moe-2.5
    python scripts/bench_llamacpp.py --bundle /root/bench/text-moe-2.5 [--model ../shared/models/text-moe]
        [--threads 1,2] [--rounds 3] [--tokens 64] [--llama-cache ~/.cache/mopeq-export/llama.cpp]
        [--perplexity ../shared/data/text_dev.txt]

llama.cpp is the one llama-cpp-python 0.3.36's sdist vendors. On first use it is built in --llama-cache (never
in the repository; about 10 minutes on 2 cores, `nice -n 19`, `-j 2`):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR; tar xzf (in DIR)
    cmake -S vendor/llama.cpp -B DIR/build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build DIR/build -j 2 --target llama-quantize llama-bench llama-perplexity

--model is converted once with the vendored convert_hf_to_gguf.py (this venv's python, vendored gguf-py; no
extra package needed) to f16, then llama-quantize makes Q2_K, Q3_K_M, Q4_K_M; all cached in
DIR/gguf/<name>-<key>, key = hash of the folder path and its weights' names, sizes and mtimes. The converter
does not know the reference tokenizer's pre-tokenizer hash: a wrapper maps unknown hashes to "gpt-2".
--model may also be a random-init real-size checkpoint (OLMoE architecture; it converts):
    python scripts/make_checkpoint.py --shape olmoe-1b-7b --layers 4 --out /root/bench/olmoe4 --device cpu

Measured, per thread count, rounds interleaving [ours, Q2_K, Q3_K_M, Q4_K_M] so load from other jobs hits
all alike: tokens/s = --tokens / total time of --tokens greedy single-token decode steps (batch 1).
Ours: `BundleModel.forward` after a 4-token prompt, ORT intra-op threads = T (`mopeq_runtime.load(threads=T)`),
one warm-up pass first. llama.cpp: `llama-bench -m X.gguf -p 0 -n TOKENS -t T -r 1 -o json` (avg_ts; it warms
up itself; stock weight repacking on). The header gives numpy copy bandwidth (read + write, 512 MiB, best of
5), the load average before the runs, and the CPU.

--perplexity FILE: `llama-perplexity -m X -f FILE -c 128 -b 128 -nr` per GGUF variant. -nr turns off the
repacked/AMX weight buffers: on a VM that lists AMX but does not enable its tile state, the -march=native
build's AMX batched matmul dies with SIGILL (tilezero); batch-1 decode in llama-bench did not. Stock
llama.cpp ignores qwen2moe's norm_topk_prob (norm_w=false), so its text-moe perplexity is not comparable
1:1 with this project's (f16: 16.79 here at -c 128 on text_dev.txt; docs/FACTS.md: 15.65 vs 14.80).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
VERSION = "0.3.36"
TARGETS = ("llama-quantize", "llama-bench", "llama-perplexity")
QUANTS = ("Q2_K", "Q3_K_M", "Q4_K_M")
# Runs convert_hf_to_gguf.py (argv[1]) with unknown BPE pre-tokenizer hashes mapped to "gpt-2".
CONVERT = """
import runpy, sys
from conversion.base import TextModel
_pre = TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        print("bench_llamacpp: unknown pre-tokenizer hash, using gpt-2", file=sys.stderr)
        return "gpt-2"
TextModel.get_vocab_base_pre = pre
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[bench_llamacpp] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list, logfile: Path | None = None, **kw) -> subprocess.CompletedProcess:
    if logfile is None:
        return subprocess.run([str(c) for c in cmd], check=True, **kw)
    with open(logfile, "a") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {r.returncode}); see {logfile}")
    return r


def build_llama(cache: Path) -> tuple[Path, Path]:
    """(vendored llama.cpp source, folder of the built tools); builds only what is missing."""
    src = cache / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    bindir = cache / "build" / "bin"
    if all((bindir / t).exists() for t in TARGETS):
        return src, bindir
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        log(f"downloading llama-cpp-python {VERSION} sdist")
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={VERSION}", "-d", cache], cache / "download.log")
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    t0 = time.time()
    log(f"building llama.cpp in {cache / 'build'} (about 10 minutes on 2 cores; log: {cache / 'build.log'})")
    nice = ["nice", "-n", "19"]
    sh([*nice, "cmake", "-S", src, "-B", cache / "build", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
        "-DCMAKE_BUILD_TYPE=Release"], cache / "build.log")
    sh([*nice, "cmake", "--build", cache / "build", "-j", "2", "--target", *TARGETS], cache / "build.log")
    log(f"llama.cpp built in {time.time() - t0:.0f} s")
    return src, bindir


def checkpoint_key(model: Path) -> str:
    h = hashlib.sha256(str(model.resolve()).encode())
    for f in sorted(model.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def gguf_variants(model: Path, src: Path, bindir: Path, cache: Path) -> dict[str, Path]:
    """f16 and the k-quants of `model`, converted once; files are written to .tmp then renamed."""
    out = cache / "gguf" / f"{model.resolve().name}-{checkpoint_key(model)}"
    out.mkdir(parents=True, exist_ok=True)
    files = {"f16": out / "f16.gguf", **{q: out / f"{q}.gguf" for q in QUANTS}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(src / "gguf-py")])}
    if not files["f16"].exists():
        t0 = time.time()
        tmp = out / "f16.gguf.tmp"
        sh(["nice", "-n", "19", sys.executable, "-c", CONVERT, src / "convert_hf_to_gguf.py", model,
            "--outtype", "f16", "--outfile", tmp], out / "convert.log", env=env)
        tmp.rename(files["f16"])
        log(f"converted {model} to f16 GGUF in {time.time() - t0:.0f} s")
    for q in QUANTS:
        if not files[q].exists():
            t0 = time.time()
            tmp = files[q].with_name(files[q].name + ".tmp")
            sh(["nice", "-n", "19", bindir / "llama-quantize", files["f16"], tmp, q], out / "quantize.log")
            tmp.rename(files[q])
            log(f"quantized {q} in {time.time() - t0:.0f} s")
    return files


def llama_tps(bindir: Path, gguf: Path, threads: int, tokens: int) -> float:
    r = sh([bindir / "llama-bench", "-m", gguf, "-p", "0", "-n", tokens, "-t", threads, "-r", "1", "-o", "json"],
           capture_output=True, text=True)
    rows = [row for row in json.loads(r.stdout) if row["n_gen"] == tokens]
    return float(rows[0]["avg_ts"])


def ours_tps(model, tokens: int) -> float:
    prompt = np.random.default_rng(0).integers(3, model.manifest.model.vocab, (1, 4)).astype(np.int64)
    logits, past = model.forward(prompt)
    total = 0.0
    for _ in range(tokens):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        t0 = time.perf_counter()
        logits, past = model.forward(nxt, past)
        total += time.perf_counter() - t0
    return tokens / total


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 5) -> float:
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best  # read + write


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def perplexity(bindir: Path, gguf: Path, text: Path) -> str:
    # -nr: no extra buffer types; their AMX batched matmul dies with SIGILL (tilezero) on this VM
    r = sh([bindir / "llama-perplexity", "-m", gguf, "-f", text, "-c", "128", "-b", "128", "-nr"],
           capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", r.stdout + r.stderr)
    return f"{m.group(1)} +/- {m.group(2)}" if m else "no estimate (see llama-perplexity output)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="bundle folder from `mopeq-export build`")
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "text-moe", help="HF checkpoint folder")
    ap.add_argument("--llama-cache", type=Path, default=Path("~/.cache/mopeq-export/llama.cpp"))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--perplexity", type=Path, help="text file for llama-perplexity on the GGUF variants")
    ap.add_argument("--paths", default="auto", help="our kernel paths (MOPEQ_KERNEL), e.g. auto,scalar")
    ap.add_argument("--kernel-library", type=Path, default=None,
                    help="a freshly built libmopeq_ops.so instead of the bundle's copy (kernel development)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    cache = args.llama_cache.expanduser()
    load_avg, copy_bw = os.getloadavg(), copy_bandwidth()  # before our own load

    import mopeq_runtime

    src, bindir = build_llama(cache)
    ggufs = gguf_variants(args.model, src, bindir, cache)
    ours = [f"mopeq bundle ({p})" for p in args.paths.split(",")]
    bundle_bytes = sum(f.stat().st_size for f in args.bundle.glob("*.onnx*"))  # graphs + weights
    sizes = {**{o: bundle_bytes for o in ours}, **{f"llama.cpp {q}": ggufs[q].stat().st_size for q in QUANTS}}
    tps: dict[tuple[str, int], list[float]] = {}
    for t in threads:
        model = mopeq_runtime.load(args.bundle, threads=t, kernel_library=args.kernel_library, require_kernel=True)
        log(f"threads {t}: {model.kernel.reason}")
        ours_tps(model, 4)  # warm-up: first-run allocations
        for r in range(args.rounds):
            for name, path in zip(ours, args.paths.split(",")):
                os.environ["MOPEQ_KERNEL"] = path  # the kernel reads it on every call
                tps.setdefault((name, t), []).append(ours_tps(model, args.tokens))
            os.environ.pop("MOPEQ_KERNEL", None)
            for q in QUANTS:
                tps.setdefault((f"llama.cpp {q}", t), []).append(llama_tps(bindir, ggufs[q], t, args.tokens))
            log(f"threads {t}, round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k[0]} {v[-1]:.1f}" for k, v in tps.items() if k[1] == t))
        del model

    print(f"decode, batch 1, {args.tokens} tokens x {args.rounds} rounds; bundle {args.bundle}, "
          f"GGUF from {args.model}")
    print(f"CPU {cpu_name()} ({os.cpu_count()} logical); numpy copy bandwidth {copy_bw / 1e9:.1f} GB/s "
          f"(read+write, 512 MiB, best of 5); load average at start {' '.join(f'{x:.2f}' for x in load_avg)}")
    print("| variant | file MiB | threads | tokens/s (median) | vs llama.cpp Q2_K |")
    print("|---|---|---|---|---|")
    for t in threads:
        base = statistics.median(tps[("llama.cpp Q2_K", t)])
        for name in sizes:
            med = statistics.median(tps[(name, t)])
            print(f"| {name} | {sizes[name] / 2**20:.1f} | {t} | {med:.1f} | {med / base:.2f}x |")
    if args.perplexity:
        print(f"\nllama-perplexity -c 128 -b 128 on {args.perplexity} (stock llama.cpp ignores qwen2moe's "
              "norm_topk_prob: not comparable 1:1)")
        print("| variant | PPL |")
        print("|---|---|")
        for name in ("f16", *QUANTS):
            print(f"| llama.cpp {name} | {perplexity(bindir, ggufs[name], args.perplexity)} |")


if __name__ == "__main__":
    main()
