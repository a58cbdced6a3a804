"""Thread count and OpenMP wait policy: decode and prefill tokens/s of the demo model on a quiet
machine and beside one competing busy process (a `while True: pass` child), per setting.

Each run is a fresh `localseek bench` process (libgomp reads its wait policy once, when it
loads). Settings and conditions alternate within every round, so a change in what the machine's
other users do hits all of them alike; the figures are medians over the rounds, and each run
records the load average before it started.

    .venv/bin/python benchmarks/threads.py --rounds 3 [--out benchmarks/results/threads-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

from localseek.bench import machine_info
from localseek.options import usable_cores

CORES = usable_cores()
POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# name -> (environment added, extra bench flags)
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {
    "default": ({}, []),
    "-t 1": ({}, ["-t", "1"]),
    f"-t {CORES}": ({}, ["-t", str(CORES)]),
    f"old default (GOMP_SPINCOUNT=30000, -t {CORES})": (
        {"GOMP_SPINCOUNT": "30000"},
        ["-t", str(CORES)],
    ),
    "GOMP_SPINCOUNT=30000, -t 1": ({"GOMP_SPINCOUNT": "30000"}, ["-t", "1"]),
    f"OMP_WAIT_POLICY=PASSIVE, -t {CORES}": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["-t", str(CORES)]),
}
CONDITIONS = ("quiet", "one busy process")


def bench_once(setting: str, n_prompt: int, n_gen: int, repeats: int) -> dict:
    extra_env, flags = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    env.update(extra_env)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "localseek", "bench", "-p", str(n_prompt), "-n", str(n_gen)]
        cmd += ["-r", str(repeats), "--json", str(out), *flags]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr}")
        rows = json.loads(out.read_text())
    by_test = {r["test"]: r for r in rows}
    return {
        "prefill_tokens_per_second": statistics.median(by_test[f"pp{n_prompt}"]["samples"]),
        "decode_tokens_per_second": statistics.median(by_test[f"tg{n_gen}"]["samples"]),
        "threads": rows[0]["threads"],
        "openmp": rows[0].get("openmp", {}),
        "command": shlex.join([f"{k}={v}" for k, v in extra_env.items()] + cmd[1:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs of every setting and condition")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens of the prefill test")
    ap.add_argument("-n", type=int, default=64, help="decode steps of the decode test")
    ap.add_argument("-r", type=int, default=3, help="counted repeats inside each bench run")
    ap.add_argument("--out", default=f"benchmarks/results/threads-{date.today().isoformat()}.json")
    args = ap.parse_args()
    # SIGTERM unwinds (SystemExit) so that the busy child is killed by the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    names = list(SETTINGS)
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate the order
        for condition in CONDITIONS if rnd % 2 == 0 else CONDITIONS[::-1]:
            busy = None
            if condition != "quiet":
                busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for setting in order:
                    load = os.getloadavg()
                    r = bench_once(setting, args.p, args.n, args.r)
                    row = {"round": rnd, "condition": condition, "setting": setting, "load": load}
                    runs.append({**row, **r})
                    print(
                        f"round {rnd} {condition:16} {setting:46} load {load[0]:4.2f}  "
                        f"pp{args.p} {r['prefill_tokens_per_second']:7.1f}  "
                        f"tg{args.n} {r['decode_tokens_per_second']:6.1f}  {r['openmp']}",
                        flush=True,
                    )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    summary = {}
    for condition in CONDITIONS:
        for setting in names:
            mine = [r for r in runs if r["condition"] == condition and r["setting"] == setting]
            summary.setdefault(condition, {})[setting] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("prefill_tokens_per_second", "decode_tokens_per_second")
            }
    for setting in names:  # the target: beside a busy process at least half the quiet speed
        for key in ("prefill_tokens_per_second", "decode_tokens_per_second"):
            quiet = summary["quiet"][setting][key]
            busy = summary["one busy process"][setting][key]
            summary["one busy process"][setting][f"{key}_vs_quiet"] = busy / quiet
    result = {
        "what": "demo model, localseek bench per thread/wait-policy setting, quiet and beside "
        "one `while True: pass` process; medians over rounds (each a median of -r repeats)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["benchmarks/threads.py", *sys.argv[1:]]),
        "machine": {**machine_info(), "usable_cores": CORES},
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
