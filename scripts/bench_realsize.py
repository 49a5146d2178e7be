"""Every stage at a real model size: wall time, peak host RSS, peak GPU memory, against the stage's own
estimate (mopeq_export/scale.py) and against the checkpoint's bytes (the issue's budgets are multiples of it).

Each stage runs as its own process (the CLI, as a user runs it); the process's peak RSS comes from
wait4(), the GPU peak and the estimate from the record the stage writes. `--build` also runs the whole
`build` in one process (its stages are then measured inside it, each with its own peak).

    python scripts/bench_realsize.py --model ckpt/qwen3 --work /tmp/bench --device cpu \\
        --stages analyze,plan,quantize,export [--samples 16] [--build --target jetson-agx-orin]

Prints one markdown table; `--json FILE` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def run(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of one child process."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t, usage.ru_maxrss * 1024


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="a new folder for the stage outputs and logs")
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stages", default="analyze,plan,quantize,export", help="separate stage processes ('' for none)")
    ap.add_argument("--samples", type=int, default=None, help="analyze calibration samples (default: the stage's)")
    ap.add_argument("--batch-size", type=int, default=None, help="analyze samples per probe")
    ap.add_argument("--probes", type=int, default=None)
    ap.add_argument("--quantize-samples", type=int, default=None)
    ap.add_argument("--quantize-args", action="append", default=None,
                    help="more flags of the quantize stage, one string (e.g. '--method signround "
                         "--balance-tokens 1024'); repeated: one quantize run each, in order, in the same table "
                         "(the first one's output is what export reads)")
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--build", action="store_true", help="also the whole build, in one process")
    ap.add_argument("--eval-windows", type=int, default=8, help="build: gate windows (the gate must run; its "
                                                                   "numbers mean nothing on random weights)")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--trust-remote-code", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=False)
    cli = [sys.executable, "-m", "mopeq_export"]
    w, m = args.work, str(args.model)
    remote = ["--trust-remote-code"] if args.trust_remote_code else []
    calib = ["--calib", str(args.calib)] if args.calib else []
    opt = lambda flag, v: [flag, str(v)] if v is not None else []  # noqa: E731
    commands = {
        "analyze": [*cli, "analyze", "--model", m, *calib, "--out", str(w / "sens"), "--device", args.device,
                    *opt("--samples", args.samples), *opt("--batch-size", args.batch_size),
                    *opt("--probes", args.probes), *remote],
        "plan": [*cli, "plan", "--sensitivity", str(w / "sens" / "sensitivity.json"), "--method", "budget",
                 "--avg-bits", str(args.avg_bits), "--out", str(w / "plan.json")],
        "quantize": [*cli, "quantize", "--model", m, "--plan", str(w / "plan.json"), *calib, "--out", str(w / "q"),
                     "--device", args.device, *opt("--samples", args.quantize_samples), *remote],
        "export": [*cli, "export", "--quantized", str(w / "q"), "--target", args.target, "--out", str(w / "onnx"),
                   *(["--trust-remote-code"] if args.trust_remote_code else [])],
    }
    records = {"analyze": w / "sens" / "sensitivity.json", "quantize": w / "q" / "quantized.json",
               "export": w / "onnx" / "export.json"}
    logs = {}
    base = commands["quantize"]
    for i, extra in enumerate(args.quantize_args or [""]):  # each variant its own stage process and output
        name, q = ("quantize", w / "q") if i == 0 else (f"quantize {extra}", w / f"q{i}")
        commands[name] = [*(str(q) if c == str(w / "q") else c for c in base), *extra.split()]
        records[name], logs[name] = q / "quantized.json", w / f"quantize{i or ''}.log"
    stages = []
    for stage in [s for s in args.stages.split(",") if s]:
        stages += [n for n in commands if n.startswith("quantize")] if stage == "quantize" else [stage]
    ck = checkpoint_bytes(args.model)
    rows = []
    for stage in stages:
        log = logs.get(stage, w / f"{stage}.log")
        code, wall, rss = run(commands[stage], log)
        res = {}
        if code == 0 and stage in records:
            res = json.loads(records[stage].read_text()).get("resources") or {}
        rows.append({"stage": stage, "exit": code, "wall_s": round(wall, 1), "peak_rss": rss,
                     "peak_gpu": res.get("peak_gpu_bytes"), "estimate": res.get("estimate_bytes"),
                     "device": res.get("device")})
        if code != 0:
            print(f"{stage} failed (exit {code}); see {log}", file=sys.stderr)
            break
    if args.build:
        build = [*cli, "build", "--model", m, "--target", args.target, "--avg-bits", str(args.avg_bits), *calib,
                 "--out", str(w / "bundle"), "--cache", str(w / "cache"), "--device", args.device,
                 "--eval-windows", str(args.eval_windows), "--eval-samples", str(args.eval_samples),
                 "--summary", str(w / "summary.json"), *remote]
        code, wall, rss = run(build, w / "build.log")
        stages = json.loads((w / "summary.json").read_text()).get("stages", {}) if (w / "summary.json").is_file() else {}
        for name, r in stages.items():  # each stage inside the one build process, its own peak
            rows.append({"stage": f"  build: {name}", "exit": 0, "wall_s": round(r["seconds"], 1),
                         "peak_rss": r["peak_rss_bytes"], "peak_gpu": r.get("peak_gpu_bytes"),
                         "estimate": r.get("estimate_bytes"), "device": r.get("device")})
        gpu = [r.get("peak_gpu_bytes") for r in stages.values() if r.get("peak_gpu_bytes")]
        rows.append({"stage": f"build ({args.target}), whole process", "exit": code, "wall_s": round(wall, 1),
                     "peak_rss": rss, "peak_gpu": max(gpu) if gpu else None, "estimate": None,
                     "device": args.device})
    print(f"\n{args.model.name}: checkpoint {ck / GiB:.2f} GiB\n")
    print("| stage | device | wall s | peak RSS GiB | RSS / checkpoint | peak GPU GiB | estimate GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gpu = f"{r['peak_gpu'] / GiB:.2f}" if r["peak_gpu"] else "-"
        est = f"{r['estimate'] / GiB:.2f}" if r["estimate"] else "-"
        ok = "" if r["exit"] == 0 else f" (exit {r['exit']})"
        print(f"| {r['stage']}{ok} | {r['device'] or '-'} | {r['wall_s']} | {r['peak_rss'] / GiB:.2f} | "
              f"{r['peak_rss'] / ck:.2f} | {gpu} | {est} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "checkpoint_bytes": ck, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
