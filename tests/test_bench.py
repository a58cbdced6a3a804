"""`localseek bench`: the JSON rows, llama-bench test names, --vs llama.cpp, bad input. Timings
are never asserted, only that they are positive numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from test_cli import assert_one_sentence_error

from localseek.bench import BenchTest, run_tests, select_tests

MACHINE_KEYS = {"platform", "cpu", "cores", "ram_bytes"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from localseek.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    from localseek.checkpoint import open_checkpoint
    from localseek.convert.gguf_writer import write_gguf

    dst = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    with open_checkpoint(tiny) as ckpt:
        return write_gguf(ckpt, dst, "f32")[0]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localseek", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_rows(rows: list[dict], engines: set[str], tests: set[str], repeats: int) -> None:
    assert {(r["engine"], r["test"]) for r in rows} == {(e, t) for e in engines for t in tests}
    for r in rows:
        assert r["tokens_per_second"] > 0 and r["stddev"] >= 0
        assert r["repeats"] == repeats and len(r["samples"]) == repeats
        assert all(s > 0 for s in r["samples"])
        assert r["threads"] == 1
        assert r["model"] and r["date"] and "bench" in r["command"]
        assert set(r["machine"]) >= MACHINE_KEYS and r["machine"]["cores"] > 0
        assert r["bytes_per_token"] > 0
        if r["test"].startswith("tg"):
            assert r["effective_gb_per_s"] > 0


def test_bench_json_rows(tiny, tmp_path):
    out = tmp_path / "r" / "bench.json"
    proc = bench(
        "--model", str(tiny), "-p", "16", "-n", "4", "-r", "2", "-t", "1", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "pp16" in proc.stdout and "tg4" in proc.stdout and "±" in proc.stdout
    check_rows(json.loads(out.read_text()), {"localseek"}, {"pp16", "tg4"}, 2)
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left over


def test_bench_json_carries_the_offload_figures(tiny, tmp_path):
    out = tmp_path / "bench.json"
    args = ("--model", str(tiny), "-p", "8", "-n", "2", "-r", "1", "-t", "1", "--json", str(out))
    proc = bench(*args, "--ram", "400KiB")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    check_rows(rows, {"localseek"}, {"pp8", "tg2"}, 1)
    offload = rows[0]["offload"]
    assert offload["lookups"] > 0 and offload["disk_bytes"] > 0
    assert 0 <= offload["ram_hit_rate"] <= 1


def test_bench_zero_skips_a_test(tiny, tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(
        "--model", str(tiny), "-p", "0", "-n", "3", "-r", "1", "-t", "1", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    check_rows(json.loads(out.read_text()), {"localseek"}, {"tg3"}, 1)


def test_bench_vs_llama_cpp(tiny_gguf, tmp_path):
    out = tmp_path / "bench.json"
    proc = bench(
        "--model", str(tiny_gguf), "-p", "16", "-n", "4", "-r", "2", "-t", "1",
        "--vs", "llama.cpp", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_rows(json.loads(out.read_text()), {"localseek", "llama.cpp"}, {"pp16", "tg4"}, 2)
    assert "vs llama.cpp" in proc.stdout
    ratios = re.findall(r"localseek\s+(pp16|tg4)\s.*\s(\d+\.\d\d)x", proc.stdout)
    assert {test for test, _ in ratios} == {"pp16", "tg4"}
    assert all(float(r) > 0 for _, r in ratios)


def test_vs_llama_cpp_needs_a_gguf(tiny):
    assert_one_sentence_error(
        bench("--model", str(tiny), "-p", "4", "-n", "2", "--vs", "llama.cpp"), "GGUF"
    )


def test_bench_bad_input(tmp_path, tiny):
    assert_one_sentence_error(bench("--model", str(tmp_path / "nope")), "no such file")
    assert_one_sentence_error(bench("--model", str(tmp_path)), "not a model folder")
    assert_one_sentence_error(bench("--model", str(tiny), "-p", "0", "-n", "0"), "no test")
    assert_one_sentence_error(bench("--model", str(tiny), "-r", "0"), "-r")
    assert_one_sentence_error(bench("--model", str(tiny), "-p", "64", "--ctx", "32"), "--ctx")


class FakeEngine:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def prefill_seconds(self, tokens: list[int]) -> float:
        self.log.append((self.name, "pp", len(tokens)))
        return 0.5

    def decode_seconds(self, first: int, tokens: list[int]) -> float:
        self.log.append((self.name, "tg", len(tokens)))
        return 0.25

    def close(self) -> None:
        pass


def test_run_tests_warms_up_and_alternates():
    log: list = []
    engines = [FakeEngine("a", log), FakeEngine("b", log)]
    results = run_tests(engines, select_tests(8, 4), repeats=3, vocab_size=100)
    # one uncounted warm-up, then 3 counted runs, alternating a, b per repeat
    assert log[:8] == [("a", "pp", 8), ("b", "pp", 8)] * 4
    assert log[8:] == [("a", "tg", 4), ("b", "tg", 4)] * 4
    assert [(r.engine, r.test) for r in results] == [
        ("a", BenchTest("pp", 8)),
        ("b", BenchTest("pp", 8)),
        ("a", BenchTest("tg", 4)),
        ("b", BenchTest("tg", 4)),
    ]
    assert results[0].samples == [16.0] * 3 and results[0].stddev == 0.0
    assert results[2].mean == 16.0 and results[2].test.name == "tg4"
