"""The tiered expert store on tiny models whose budgets force all three tiers (a GPU cache of a
few experts, RAM for part of the rest, the remainder on disk): greedy output equal to the
unbudgeted run, RAM within budget, experts in use never evicted, late prefetches only stall."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import gguf_util as gu
import numpy as np
import pytest

import localseek
from localseek.checkpoint import open_checkpoint
from localseek.convert.gguf_writer import write_gguf
from localseek.demo import _TINY_CONFIG, build_tiny_model, random_state
from localseek.errors import LocalseekError
from localseek.offload.cache import make_policy
from localseek.offload.store import DISK_IO, ExpertSource, SlotPool

PROMPT = list(range(2, 14))
N_NEW = 12
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    hf = build_tiny_model(d / "hf", seed=3)
    with open_checkpoint(hf) as ck:
        q8 = write_gguf(ck, d / "q8.gguf", "q8_0")[0]
    # rows of 256 so llama.cpp picks Q4_K (and Q6_K for some ffn_down) rather than fallbacks
    cfg = {**_TINY_CONFIG, "hidden_size": 256, "moe_intermediate_size": 256, "vocab_size": 320}
    wide = d / "wide"
    wide.mkdir()
    from safetensors.torch import save_file

    save_file(random_state(cfg, seed=4), str(wide / "model.safetensors"))
    (wide / "config.json").write_text(json.dumps(cfg))
    gu.write_tokenizer(wide)
    with open_checkpoint(wide) as ck:
        f32 = write_gguf(ck, d / "wide-f32.gguf", "f32")[0]
    q4km = d / "wide-q4_k_m.gguf"
    gu.llama_quantize(f32, q4km, LLAMA_FTYPE_MOSTLY_Q4_K_M)
    return {"q8_0": q8, "hf": hf, "q4_k_m": q4km}


_REFERENCE: dict = {}


def _reference(path):
    """Greedy tokens of the unbudgeted model (computed once per file)."""
    if path not in _REFERENCE:
        m = localseek.load(path, exact=True, ctx=64)
        _REFERENCE[path] = list(m.generate(PROMPT, N_NEW))
    return _REFERENCE[path]


def _budgets(path, gpu_experts: int, ram_experts: int, exact: bool = True, **kw):
    """A model of ``path`` with a GPU cache of ``gpu_experts`` and RAM of ``ram_experts``."""
    probe = localseek.load(path, exact=True, ctx=64, gpu_mem="4GiB", ram="4GiB")
    fixed, eb = probe.plan.fixed_bytes, max(lp.expert_bytes for lp in probe.plan.layers)
    probe.close()
    gpu_mem, ram = fixed + gpu_experts * eb, ram_experts * eb
    model = localseek.load(path, exact=exact, ctx=64, gpu_mem=gpu_mem, ram=ram, **kw)
    return model, ram


@pytest.mark.parametrize("kind", ["q8_0", "hf", "q4_k_m"])
def test_three_tiers_give_the_unbudgeted_greedy_output(files, kind) -> None:
    want = _reference(files[kind])
    model, ram = _budgets(files[kind], gpu_experts=4, ram_experts=10)
    counts = model.plan.tier_counts()
    assert counts["gpu"] > 0 and counts["ram"] > 0 and counts["disk"] > 0, counts
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    s = gen.stats.offload
    assert s.gpu_hits > 0 and s.ram_hits > 0 and s.disk_loads > 0
    assert s.tokens == len(PROMPT) + len(want) - 1  # the prefill, then one token per step
    assert 0 < gen.stats.expert_cache_hit_rate < 1
    assert s.disk_bytes_per_token > 0
    # RAM held by expert weights: the store's slot buffers, within the budget
    held = model.experts.ram_nbytes()
    buffers = sum(
        t.numel() * t.element_size() for p in model.experts.ram.values() for t in p.data + p.scales
    )
    assert held == buffers <= ram
    model.close()


@pytest.mark.parametrize("exact", [True, False])
def test_logits_match_the_unbudgeted_model(files, exact) -> None:
    # exact=False: the kernel's fast mode (int8 activations) on both sides
    ref = localseek.load(files["q8_0"], exact=exact, ctx=64).logits(PROMPT)
    model, _ = _budgets(files["q8_0"], gpu_experts=2, ram_experts=8, exact=exact)
    got = model.logits(PROMPT)  # a prefill needs more experts per layer than RAM holds: rounds
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    model.close()


@pytest.mark.parametrize("policy", ["lfu", "static"])
def test_policies_keep_the_output(files, policy) -> None:
    want = _reference(files["q8_0"])
    model, _ = _budgets(files["q8_0"], gpu_experts=6, ram_experts=10, policy=policy)
    start = {layer: set(p.slot_of) for layer, p in model.experts.gpu.items()}
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    now = {layer: set(p.slot_of) for layer, p in model.experts.gpu.items()}
    if policy == "static":  # the hot set stays; nothing is promoted
        assert now == start and gen.stats.offload.promotions == 0
    else:
        assert gen.stats.offload.promotions > 0
    model.close()


def test_an_expert_in_use_is_never_evicted(files) -> None:
    # the smallest RAM that works: every token's experts just fit, so a prefill goes in rounds
    # and each round evicts the previous one's experts while prefetches compete for slots
    want = _reference(files["q8_0"])
    k = _TINY_CONFIG["num_experts_per_tok"]
    n_moe = len(range(_TINY_CONFIG["first_k_dense_replace"], _TINY_CONFIG["num_hidden_layers"]))
    model, _ = _budgets(files["q8_0"], gpu_experts=0, ram_experts=k * n_moe)
    pools = model.experts.ram.values()
    assert all(p.slots == k for p in pools)
    in_use: list[tuple[int, int]] = []
    original = SlotPool.evict

    def watched(self, slot):
        if self.pins[slot]:
            in_use.append((slot, int(self.expert[slot])))
        original(self, slot)

    SlotPool.evict = watched
    try:
        assert list(model.generate(PROMPT, N_NEW)) == want
    finally:
        SlotPool.evict = original
    assert in_use == []
    assert sum(p.evictions for p in pools) > 0
    model.close()


def test_pinned_slots_are_not_given_up() -> None:
    pool = SlotPool.__new__(SlotPool)  # bookkeeping only, no buffers
    pool.slots, pool.policy, pool.predicted, pool.evictions = 2, make_policy("lru", 2), set(), 0
    pool.prefetched = set()
    pool.expert = np.array([5, 7])
    pool.slot_of = {5: 0, 7: 1}
    pool.loading, pool.pins = {}, np.array([1, 1])
    assert pool.take_slot() is None
    with pytest.raises(AssertionError):
        pool.evict(0)
    pool.pins[1] = 0
    assert pool.take_slot() == 1 and pool.slot_of == {5: 0}


def test_a_late_prefetch_is_only_a_stall(files, monkeypatch) -> None:
    want = _reference(files["q8_0"])
    slow = ExpertSource.read

    def read(self, *a):
        time.sleep(0.02)
        return slow(self, *a)

    monkeypatch.setattr(ExpertSource, "read", read)
    model, _ = _budgets(files["q8_0"], gpu_experts=2, ram_experts=10)
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    s = gen.stats.offload
    assert s.prefetch_loads > 0 and s.stall_seconds > 0
    assert s.recall() is not None and 0 < s.recall() <= 1 and 0 < s.precision() <= 1
    # every MoE layer is predicted: the first from the dense layer before it
    assert sorted(s.predictor) == model.config.moe_layers
    model.close()


def test_prefetch_off_keeps_the_output_and_predicts_nothing(files) -> None:
    want = _reference(files["q8_0"])
    model, _ = _budgets(files["q8_0"], gpu_experts=2, ram_experts=10, prefetch=False)
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    assert gen.stats.offload.prefetch_loads == 0 and gen.stats.offload.recall() is None
    model.close()


@pytest.mark.parametrize("disk_io", ["uncached", "direct"])
def test_disk_reads_that_bypass_the_page_cache_keep_the_output(files, disk_io) -> None:
    # direct: O_DIRECT through aligned bounce buffers (expert ranges are not page-aligned in a
    # GGUF, and the last one's pages run past the end of the file); uncached: dropped after
    want = _reference(files["q8_0"])
    try:
        model, _ = _budgets(files["q8_0"], gpu_experts=2, ram_experts=10, disk_io=disk_io)
    except LocalseekError as e:
        pytest.skip(str(e))  # a filesystem without O_DIRECT (tmpfs)
    assert model.experts.source.disk_io == disk_io
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    assert gen.stats.offload.disk_loads > 0
    model.close()


def test_slow_prefetches_holding_every_slot_only_stall(files, monkeypatch) -> None:
    # the smallest RAM, reads slowed down: a layer can find every slot taken by prefetches
    # still queued or in flight; it cancels or waits for them, never fails
    want = _reference(files["q8_0"])
    slow = ExpertSource.read

    def read(self, *a):
        time.sleep(0.03)
        return slow(self, *a)

    monkeypatch.setattr(ExpertSource, "read", read)
    k = _TINY_CONFIG["num_experts_per_tok"]
    n_moe = len(range(_TINY_CONFIG["first_k_dense_replace"], _TINY_CONFIG["num_hidden_layers"]))
    model, _ = _budgets(files["q8_0"], gpu_experts=0, ram_experts=k * n_moe)
    gen = model.generate(PROMPT, N_NEW)
    assert list(gen) == want
    s = gen.stats.offload
    assert s.prefetch_loads > 0 and s.stall_seconds > 0
    model.close()


@pytest.mark.parametrize("readers", [1, 4])
def test_a_layer_whose_slots_all_hold_wrong_prefetches_still_computes(files, readers) -> None:
    # every RAM slot of a layer is being filled by a prefetch of experts the layer then does
    # not choose: queued ones are cancelled, running ones waited for, and the result is exact
    import torch

    slow = ExpertSource.read
    ref = localseek.load(files["q8_0"], exact=True, ctx=64)
    k = _TINY_CONFIG["num_experts_per_tok"]
    model, _ = _budgets(files["q8_0"], gpu_experts=0, ram_experts=2 * k, readers=readers)
    experts = model.experts
    layer = model.config.moe_layers[0]
    ram = experts.ram[layer]
    assert ram.slots == k
    wrong = [e for e in range(model.config.n_routed_experts) if e not in ram.slot_of][:k]
    needed = [e for e in range(model.config.n_routed_experts) if e not in wrong][-k:]

    def read(self, *a):
        time.sleep(0.1)
        return slow(self, *a)

    ExpertSource.read = read
    try:
        experts._prefetch(layer, wrong)
        assert len(ram.loading) == k and set(ram.slot_of) == set(wrong)
        x = torch.randn(1, model.config.hidden_size)
        ids = torch.tensor([needed])
        w = torch.full((1, k), 1.0 / k)
        got = experts(layer, x, ids, w)
    finally:
        ExpertSource.read = slow
    want = ref.experts(layer, x, ids, w)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    s = experts.stats
    assert s.disk_loads >= k and s.stall_seconds > 0
    if readers == 1:  # the prefetches still queued behind the first were dropped
        assert s.prefetch_cancelled > 0
    model.close()


def test_reads_the_forward_waits_for_go_before_prefetches() -> None:
    import threading

    from localseek.offload.store import Readers

    order, gate = [], threading.Event()

    class Source:
        def read(self, layer, expert, out, scales):
            gate.wait()
            order.append(expert)
            return 1

        def close(self):
            pass

    class Pool:
        def host_views(self, slot):
            return [], []

    readers, pool = Readers(Source(), threads=1), Pool()
    first = readers.submit(0, 0, pool, 0)  # taken by the one thread, held at the gate
    while not first.running():
        time.sleep(0.001)
    pre = [readers.submit(0, e, pool, e, urgent=False) for e in (1, 2, 3, 4)]
    need = readers.submit(0, 5, pool, 5)
    readers.hurry(pre[2])  # a prefetch the forward now waits for
    assert readers.cancel(pre[3]) and pre[3].cancelled()
    gate.set()
    need.result()
    readers.close()
    assert order == [0, 3, 5, 1, 2]  # urgent ones in the order they were asked for
    assert not readers.cancel(pre[0])  # done: too late to cancel


def test_ranks_whose_guesses_rarely_come_true_are_not_read(files) -> None:
    import torch

    from localseek.offload.predictor import NextLayerPredictor

    with open_checkpoint(files["q8_0"]) as ck:
        cfg = ck.config
    E, D, k = cfg.n_routed_experts, cfg.hidden_size, cfg.num_experts_per_tok
    pred = NextLayerPredictor(cfg, {1: (torch.randn(E, D), None), 2: (torch.randn(E, D), None)})
    named = pred.predict(2, torch.randn(1, D))
    assert len(named) == pred.k and all(pred.worth_reading(2, r) for r in range(pred.k))
    for _ in range(20):  # of the experts on disk, those at the top k ranks are chosen
        pred.score(2, list(enumerate(named)), named[:k])
    assert [r for r in range(pred.k) if pred.worth_reading(2, r)] == list(range(k))
    assert all(pred.worth_reading(1, r) for r in range(pred.k))  # counted per layer


def test_auto_reads_files_larger_than_ram_with_o_direct(files, monkeypatch) -> None:
    import torch

    from localseek.offload import store

    with open_checkpoint(files["q8_0"]) as ck:
        src = ExpertSource(ck, ck.config.moe_layers, torch.float32)
        assert src.disk_io == "plain"  # the file fits in RAM: the page cache may serve it
        src.close()
        monkeypatch.setattr(store, "_ram_bytes", lambda: 1024)
        src = ExpertSource(ck, ck.config.moe_layers, torch.float32)
        want = "direct" if store._direct_ok(files["q8_0"]) else "plain"
        assert src.disk_io == want
        src.close()


def test_every_expert_reads_the_same_bytes_whichever_way_it_is_read(files) -> None:
    import torch

    with open_checkpoint(files["q4_k_m"]) as ck:
        cfg = ck.config
        try:
            sources = [ExpertSource(ck, cfg.moe_layers, torch.float32, m) for m in DISK_IO]
        except LocalseekError as e:
            pytest.skip(str(e))
        for layer in cfg.moe_layers:
            spec = sources[0].specs[layer]
            for e in range(cfg.n_routed_experts):
                got = []
                for src in sources:
                    out = [np.full((p.shape[0], p.row_bytes), 0xAA, np.uint8) for p in spec]
                    scales = [np.zeros(p.scale_shape, np.float32) for p in spec]
                    assert src.read(layer, e, out, scales) == sum(p.nbytes for p in spec)
                    got.append(out)
                for out in got[1:]:
                    assert all(np.array_equal(a, b) for a, b in zip(got[0], out, strict=True))
        for src in sources:
            src.close()


def test_a_budget_that_cannot_hold_the_fixed_part_is_refused_before_loading(files) -> None:
    with pytest.raises(LocalseekError, match=r"cannot hold the fixed part .* short\.$"):
        localseek.load(files["q8_0"], ctx=64, gpu_mem="100KiB", ram="1GiB")


def _cli(capsys, *args):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from localseek.cli.main import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_generate_and_profile(files, tmp_path, capsys) -> None:
    path = files["q8_0"]
    budget = ["--gpu-mem", "760KiB", "--ram", "60KiB", "--ctx", "64"]
    rc, _, err = _cli(capsys, "generate", "--model", path, "-p", "hi", "--gpu-mem", "1KiB")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "short" in err
    rc, out, _ = _cli(capsys, "plan", "--model", path, *budget, "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["experts"]["gpu"] > 0 and d["experts"]["disk"] > 0 and d["ram_bytes"] <= 60 * 1024
    rc, out, _ = _cli(capsys, "plan", "--model", path, *budget)
    assert rc == 0 and "fixed part" in out and "GPU cache" in out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The old sailor said\nIn the morning the children\n")
    stats = tmp_path / "stats.json"
    rc, _, err = _cli(
        capsys, "profile", "--model", path, "--prompts", prompts, "--out", stats, "-n", "4"
    )
    assert rc == 0, err
    usage = json.loads(stats.read_text())
    assert usage["tokens"] > 0 and set(usage["layers"]) == {"1", "2"}
    rc, out, _ = _cli(capsys, "plan", "--model", path, *budget, "--stats", stats, "--json")
    layer = json.loads(out)["layers"][0]
    counts = usage["layers"][str(layer["layer"])]
    assert min(counts[e] for e in layer["gpu"]) >= max(counts[e] for e in layer["disk"])
    rc, out, err = _cli(
        capsys,
        "generate",
        "--model",
        path,
        "-p",
        "The old sailor",
        "-n",
        "6",
        *budget,
        "--stats",
        stats,
    )
    assert rc == 0, err
    assert "GPU expert cache hits" in err and "MiB/token" in err


def test_a_bad_budget_from_the_command_line_is_one_sentence(files) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "localseek", "plan", "--model", str(files["q8_0"]), "--ram", "lots"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "localseek: error: --ram 'lots' is not a size (write e.g. 24GiB, 512MiB, 1.5GB or plain "
        "bytes)."
    ]


def test_offload_stats_survive_subtraction() -> None:
    from localseek.offload.stats import OffloadStats

    a = OffloadStats(tokens=3, lookups=10, gpu_hits=4, ram_hits=3, predictor={2: [3, 4, 6]})
    b = a + a
    assert (b - a).to_dict() == a.to_dict()
    assert a.expert_cache_hit_rate == 0.4 and a.ram_hit_rate == 0.5 and a.recall(2) == 0.75
