"""GPU expert cache and predictor, measured on routing traces from real generation.

    .venv/bin/python benchmarks/expert_cache.py [--model P] [--tokens 96] [--seqs 4]
        [--disk-model BIG.gguf --ram 1GiB --disk-tokens 16]

1. Trace: greedy decoding from a few fixed random prompts records each step's experts per
   MoE layer (the default model is the bundled demo model, trained here: run it with
   ``--weights trained``; random-weight models route noise-like and are labelled "random").
2. Hit rate of a GPU cache of 1%..50% of each layer's experts, per policy (lru, lfu with decay,
   a static hot set profiled on the first half of the trace); all policies are scored on the
   second half after warming on the first. Bytes moved per token: misses x expert bytes.
3. Predictor recall@k and precision per layer, from the tiered store's own counters.
4. With --disk-model: generation under a RAM budget smaller than the model's experts, with the
   predictor on and off: disk bytes per token, stall seconds, decode tokens per second.

Writes benchmarks/results/expert_cache-DATE.json and one PNG plot beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil

import localseek
from localseek.model.moe import MoE
from localseek.offload.cache import make_policy

FRACTIONS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
POLICIES = ["lru", "lfu", "static"]


def trace(model, seqs: int, tokens: int) -> list[dict[int, list[int]]]:
    """Per decode step: layer -> the experts it used."""
    steps: list[dict[int, list[int]]] = []
    moes = [b.ffn for b in model.net.layers if isinstance(b.ffn, MoE)]
    inner = [m.experts for m in moes]
    current: dict[int, list[int]] = {}

    def wrap(experts):
        def call(layer, x, ids, w):
            if ids.shape[0] == 1:  # decode steps only
                current[layer] = sorted(set(ids.flatten().tolist()))
            return experts(layer, x, ids, w)

        return call

    for m in moes:
        m.experts = wrap(m.experts)
    rng = np.random.default_rng(0)
    try:
        for _ in range(seqs):
            prompt = rng.integers(2, model.config.vocab_size, 8).tolist()
            gen = model.generate(prompt, tokens)
            for _tok in gen:
                if current:
                    steps.append(dict(current))
                    current.clear()
    finally:
        for m, e in zip(moes, inner, strict=True):
            m.experts = e
    return steps


def simulate(steps: list[list[int]], slots: int, policy: str, hot: list[int], warm: int) -> float:
    """Hit rate of one layer's cache of ``slots`` over steps[warm:], warmed on steps[:warm]."""
    pol = make_policy(policy, slots)
    slot_of = {e: s for s, e in enumerate(hot[:slots])}
    expert = {s: e for e, s in slot_of.items()}
    hits = lookups = 0
    for i, used in enumerate(steps):
        for e in used:
            counted = i >= warm
            lookups += counted
            if e in slot_of:
                hits += counted
                pol.touch(slot_of[e])
                continue
            if not pol.admits_misses:
                continue
            victim = pol.victim([s for s in expert if expert[s] not in used])
            if victim is None:
                continue
            del slot_of[expert[victim]]
            expert[victim] = e
            slot_of[e] = victim
            if hasattr(pol, "reset"):
                pol.reset(victim)
            pol.touch(victim)
    return hits / lookups if lookups else 0.0


def hit_rates(steps, cfg, expert_bytes) -> list[dict]:
    E = cfg.n_routed_experts
    warm = len(steps) // 2
    rows = []
    for frac in FRACTIONS:
        slots = max(1, round(frac * E))
        for policy in POLICIES:
            rates = []
            for layer in cfg.moe_layers:
                seq = [s[layer] for s in steps]
                counts = np.zeros(E)
                for used in seq[:warm]:
                    counts[used] += 1
                hot = [int(e) for e in np.lexsort((np.arange(E), -counts))]
                rates.append(simulate(seq, slots, policy, hot, warm))
            lookups = np.mean([len(s[layer]) for s in steps[warm:] for layer in cfg.moe_layers])
            miss_per_token = (1 - np.mean(rates)) * lookups * len(cfg.moe_layers)
            rows.append(
                {
                    "fraction": frac,
                    "slots_per_layer": slots,
                    "policy": policy,
                    "hit_rate": float(np.mean(rates)),
                    "hit_rate_per_layer": [float(r) for r in rates],
                    "bytes_moved_per_token": float(miss_per_token * expert_bytes),
                }
            )
    return rows


def predictor(path: str, seqs: int, tokens: int) -> dict:
    """Recall and precision per layer with every expert in RAM (nothing else changes them)."""
    model = localseek.load(path, ram="1TiB", ctx=256)
    rng = np.random.default_rng(1)
    for _ in range(seqs):
        for _tok in model.generate(rng.integers(2, model.config.vocab_size, 8).tolist(), tokens):
            pass
    s = model.offload_stats
    model.close()
    return {
        "recall": s.recall(),
        "precision": s.precision(),
        "k_plus_margin": model.experts.predictor.k,
        "per_layer": {
            str(k): {"recall": s.recall(k), "precision": s.precision(k)}
            for k in sorted(s.predictor)
        },
    }


def disk_run(path: str, ram: str, tokens: int) -> list[dict]:
    rows = []
    for prefetch in (True, False):
        model = localseek.load(path, ram=ram, prefetch=prefetch, ctx=256)
        ids = list(range(2, 10))
        gen = model.generate(ids, tokens)
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        wall = time.perf_counter() - t0
        s = gen.stats.offload
        rows.append(
            {
                "prefetch": prefetch,
                "ram": ram,
                "tokens": n,
                "wall_seconds": wall,
                "decode_tokens_per_second": gen.stats.decode_tokens_per_second,
                **{k: v for k, v in s.to_dict().items() if k != "predictor_per_layer"},
                "expert_bytes_total": model.plan.expert_bytes,
                "ram_bytes": model.plan.ram_bytes,
            }
        )
        model.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model to trace (default: the demo model)")
    ap.add_argument(
        "--weights", default="random", choices=["random", "trained"], help="how the model was made"
    )
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--disk-model", default=None, help="a GGUF larger than --ram")
    ap.add_argument("--ram", default="1GiB")
    ap.add_argument("--disk-tokens", type=int, default=16)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from localseek.demo import default_model

    path = str(args.model or default_model())
    model = localseek.load(path, ctx=256)
    steps = trace(model, args.seqs, args.tokens)
    cfg = model.config
    probe = localseek.load(path, ram="1TiB", ctx=256)
    expert_bytes = probe.plan.layers[0].expert_bytes
    probe.close()
    result = {
        "benchmark": "expert_cache",
        "model": path,
        "weights": args.weights,
        "n_routed_experts": cfg.n_routed_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "moe_layers": len(cfg.moe_layers),
        "decode_steps": len(steps),
        "expert_bytes": expert_bytes,
        "hit_rates": hit_rates(steps, cfg, expert_bytes),
        "predictor": predictor(path, args.seqs, args.tokens // 2),
        "machine": {
            "platform": platform.platform(),
            "cpus": psutil.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    if args.disk_model:
        result["disk"] = disk_run(args.disk_model, args.ram, args.disk_tokens)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"expert_cache-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "hit_rates"}, indent=1))
    for r in result["hit_rates"]:
        print(f"{r['fraction']:>5.0%} {r['policy']:<6} hit rate {r['hit_rate']:.1%}")
    print(f"wrote {stem}.json and .png")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in POLICIES:
        rows = [r for r in result["hit_rates"] if r["policy"] == policy]
        ax.plot(
            [100 * r["fraction"] for r in rows],
            [100 * r["hit_rate"] for r in rows],
            marker="o",
            label=policy,
        )
    ax.set_xscale("log")
    ax.set_xlabel("GPU cache slots (% of a layer's experts)")
    ax.set_ylabel("GPU cache hit rate (%)")
    name = Path(result["model"]).name
    ax.set_title(f"expert cache: {name} ({result['weights']} weights)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
