"""Train localseek's bundled demo model: a small DeepSeek-V3-architecture MoE, on the CPU.

The model has the whole V3 architecture: MLA with a query LoRA (q_lora_rank) and a latent KV
(kv_lora_rank + decoupled RoPE dims), one leading dense layer, then DeepSeekMoE layers with 16
routed experts (top-4, 4 groups of which 2 are kept per token) and one shared expert, sigmoid
routing, and the auxiliary-loss-free load balancing of DeepSeek-V3: after every optimizer step
each layer's ``e_score_correction_bias`` moves down by ``--bias-rate`` for experts that got more
than their share of tokens and up for those that got fewer (outside the gradient). The network
is transformers' ``DeepseekV3ForCausalLM``, trained in float32 and saved in bfloat16.

Corpus: the English fortune cookies of Debian's ``fortunes`` and ``fortunes-min`` packages
(fortune-mod 1.99.1; BSD licence of the University of California, see
/usr/share/doc/fortunes/copyright), every file in /usr/share/games/fortunes except the ASCII
art ones. Fortunes are deduplicated, shuffled with the seed, and 5% of them are held out: the
held-out part is never seen by the tokenizer trainer nor the model, and ships as
``heldout.txt`` beside the model. About a fifth of the training fortunes are wrapped as chat
turns (``<｜User｜>Tell me a fortune.<｜Assistant｜>...``) so that ``localseek chat`` answers
with one.

Tokenizer: byte-level BPE trained with ``tokenizers`` through
``localseek.demo.write_bpe_tokenizer`` (DeepSeek-V3's pre-tokenizer and special tokens, the
DeepSeek chat template).

Reproduce (26 minutes on one thread of a 2-core machine shared with other work; deterministic
for a given seed, torch build and thread count)::

    apt-get install fortunes fortunes-min
    .venv/bin/python tools/train_demo.py --out localseek/data/demo

One thread is the default on purpose: on a 2-core machine shared with other work, two torch
threads wait on each other at every parallel region and ran 15-30 times slower than one.

Output: config.json (architectures DeepseekV3ForCausalLM), model.safetensors (bfloat16),
tokenizer.json, tokenizer_config.json, generation_config.json, heldout.txt and train_log.json
(settings, loss curve, held-out bits per byte against a unigram byte model, per-layer expert
usage entropy).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localseek.demo import SPECIAL_TOKENS, write_bpe_tokenizer  # noqa: E402
from localseek.tokenizer import DEEPSEEK_CHAT_TEMPLATE  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
SKIP_FILES = {"art", "ascii-art", "translate-me"}  # pictures, and one file of non-English text
HELD_OUT = 0.05
CHAT_SHARE = 0.2
CHAT_PROMPTS = [
    "Tell me a fortune.",
    "Say something wise.",
    "Tell me something.",
    "Give me a quote.",
    "Tell me a joke.",
    "What does my fortune say?",
]

# hidden_size and moe_intermediate_size are multiples of 256 so that every expert row is a whole
# number of Q4_K super-blocks (quantize falls back to Q8_0 otherwise); 12.3M parameters, 24.6 MB
# of BF16 safetensors, under the 25 MiB the package allows for the demo.
MODEL = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 128,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def read_fortunes(folder: Path) -> list[str]:
    """Every fortune of the English files, whitespace-normalised and deduplicated, in file order."""
    seen: set[str] = set()
    out: list[str] = []
    for f in sorted(folder.iterdir()):
        if f.suffix in (".dat", ".u8") or f.is_symlink() or f.name in SKIP_FILES:
            continue
        text = f.read_text(encoding="utf-8")
        for raw in text.split("\n%\n"):
            lines = [line.replace("\t", "    ").rstrip() for line in raw.strip("\n%").split("\n")]
            fortune = "\n".join(lines).strip("\n")
            if fortune.strip() and fortune not in seen:
                seen.add(fortune)
                out.append(fortune)
    if not out:
        raise SystemExit(f"no fortunes found in {folder}: apt-get install fortunes fortunes-min")
    return out


def split(fortunes: list[str], seed: int) -> tuple[list[str], list[str]]:
    docs = list(fortunes)
    random.Random(seed).shuffle(docs)
    n_held = int(len(docs) * HELD_OUT)
    return docs[n_held:], docs[:n_held]


def token_stream(tok, docs: list[str], seed: int) -> torch.Tensor:
    """BOS doc EOS, back to back; a share of the docs as one chat turn. (N,) int64."""
    rng = random.Random(seed + 1)
    bos, eos = tok.token_to_id(SPECIAL_TOKENS[0]), tok.token_to_id(SPECIAL_TOKENS[1])
    user, assistant = tok.token_to_id(SPECIAL_TOKENS[2]), tok.token_to_id(SPECIAL_TOKENS[3])
    ids: list[int] = []
    for doc in docs:
        ids.append(bos)
        if rng.random() < CHAT_SHARE:
            prompt = rng.choice(CHAT_PROMPTS)
            ids += [user, *tok.encode(prompt).ids, assistant]
        ids += tok.encode(doc).ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab_size: int, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = {k: v for k, v in MODEL.items() if k not in ("architectures", "model_type")}
    config = DeepseekV3Config(
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **cfg,
    )
    return DeepseekV3ForCausalLM(config)


class ExpertLoad:
    """Counts the tokens each routed expert receives, from forward hooks on the routers."""

    def __init__(self, model):
        self.routers = {}
        self.counts: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.routers[i] = gate
                gate.register_forward_hook(self._hook(i))
        self.reset()

    def _hook(self, i: int):
        def hook(module, args, output):
            topk_ids = output[2]  # (N, k)
            n = module.num_experts
            self.counts[i] += torch.bincount(topk_ids.flatten(), minlength=n).double()

        return hook

    def reset(self) -> None:
        self.counts = {
            i: torch.zeros(r.num_experts, dtype=torch.float64) for i, r in self.routers.items()
        }

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Auxiliary-loss-free balancing: overloaded experts' bias down, underloaded up."""
        for i, router in self.routers.items():
            load = self.counts[i]
            router.e_score_correction_bias += rate * torch.sign(load.mean() - load).float()

    def entropy(self) -> dict[int, float]:
        """Per layer: entropy of the expert-usage distribution over the counted tokens, in bits."""
        out = {}
        for i, c in self.counts.items():
            p = c / c.sum()
            out[i] = float(-(p[p > 0] * p[p > 0].log2()).sum())
        return out


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq: int, batch: int) -> float:
    """Mean NLL in nats per predicted token over non-overlapping windows of ``stream``."""
    model.eval()
    n = (len(stream) - 1) // seq
    x = stream[: n * seq].view(n, seq)
    y = stream[1 : n * seq + 1].view(n, seq)
    total = 0.0
    for b in range(0, n, batch):
        logits = model(input_ids=x[b : b + batch], use_cache=False).logits
        total += F.cross_entropy(
            logits.flatten(0, 1), y[b : b + batch].flatten(), reduction="sum"
        ).item()
    model.train()
    return total / (n * seq)


def unigram_byte_bits(train_text: str, held_text: str) -> float:
    """Cross-entropy in bits per byte of held-out text under the training bytes' unigram
    distribution (add-one smoothed over 256 byte values)."""
    counts = torch.bincount(
        torch.frombuffer(bytearray(train_text.encode()), dtype=torch.uint8).long(), minlength=256
    )
    p = (counts.double() + 1) / (counts.sum() + 256)
    held = torch.frombuffer(bytearray(held_text.encode()), dtype=torch.uint8).long()
    return float(-p.log2()[held].mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "localseek" / "data" / "demo")
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--bias-rate", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from tokenizers import Tokenizer

    train_docs, held_docs = split(read_fortunes(args.corpus), args.seed)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_bpe_tokenizer(tmp, train_docs, args.vocab, chat_template=DEEPSEEK_CHAT_TEMPLATE)
    tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    assert tok.token_to_id(SPECIAL_TOKENS[0]) == 0 and tok.token_to_id(SPECIAL_TOKENS[1]) == 1
    train = token_stream(tok, train_docs, args.seed)
    held_text = "\n\n".join(held_docs) + "\n"
    (tmp / "heldout.txt").write_text(held_text, encoding="utf-8")
    held = torch.tensor(tok.encode(held_text).ids, dtype=torch.long)
    print(
        f"{len(train_docs)} training fortunes ({len(train)} tokens), "
        f"{len(held_docs)} held out ({len(held)} tokens, {len(held_text.encode())} bytes)",
        flush=True,
    )

    model = build_model(tok.get_vocab_size(), args.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=True,
    )
    load = ExpertLoad(model)
    g = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1)
    log = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=g)
        window = train[starts[:, None] + offsets]  # (B, seq + 1)
        load.reset()
        logits = model(input_ids=window[:, :-1], use_cache=False).logits  # (B, seq, V)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        load.update_bias(args.bias_rate)
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            print(f"step {step:5d}  loss {loss.item():.3f}  {elapsed:7.1f}s", flush=True)

    train_seconds = time.perf_counter() - t0
    model.eval()
    load.reset()
    nll = evaluate(model, held, args.seq, args.batch)
    entropy = load.entropy()
    max_bits = math.log2(MODEL["n_routed_experts"])
    held_bytes = len(held_text.encode())
    bpb = nll * (len(held) - 1) / math.log(2) / held_bytes
    report = {
        "corpus": "Debian fortunes + fortunes-min (fortune-mod 1.99.1, BSD licence)",
        "seed": args.seed,
        "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": n_params,
        "train_tokens": len(train),
        "train_seconds": round(train_seconds, 1),
        "heldout_tokens": len(held),
        "heldout_bytes": held_bytes,
        "heldout_perplexity": round(math.exp(nll), 3),
        "heldout_bits_per_byte": round(bpb, 4),
        "unigram_byte_bits_per_byte": round(
            unigram_byte_bits("\n\n".join(train_docs), held_text), 4
        ),
        "expert_entropy_bits": {str(k): round(v, 4) for k, v in entropy.items()},
        "expert_entropy_fraction_of_max": {
            str(k): round(v / max_bits, 4) for k, v in entropy.items()
        },
        "log": log,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "log"}, indent=2), flush=True)

    model.to(torch.bfloat16)
    model.generation_config.do_sample = False
    model.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    print(f"saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
