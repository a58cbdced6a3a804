"""`localseek chat` through a pseudo-terminal (pexpect) and through piped stdin, bad input, and
the streaming <think> splitter."""

from __future__ import annotations

import re
import subprocess
import sys

import pexpect
import pytest
from test_cli import assert_one_sentence_error

from localseek.cli.ui import ThinkSplitter

PROMPT = ">>> "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from localseek.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "localseek", "chat", *args],
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    child.expect_exact(PROMPT)
    return child


def prompt_tokens(child: pexpect.spawn) -> tuple[int, int]:
    """Send /stats; return (last answer's, session's) prompt tokens."""
    child.sendline("/stats")
    child.expect(r"prompt tokens\s+(\d+)\s+(\d+)")
    last, session = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(PROMPT)
    return last, session


def answer(child: pexpect.spawn, text: str) -> None:
    child.sendline(text)
    child.expect(r"prefill [\d.]+ tok/s · decode [\d.]+ tok/s · RAM [\d.]+ GiB")
    child.expect_exact(PROMPT)


def test_two_turns_stats_reset_exit(tiny):
    child = spawn("--model", str(tiny), "-n", "8", "--temperature", "0")
    assert "deepseek_v3" in child.before and "cpu" in child.before
    answer(child, "hello")
    answer(child, "hello again")
    second, session = prompt_tokens(child)
    first = session - second
    assert second > first  # the second prompt carries the first turn: history goes through
    child.sendline("/reset")
    child.expect_exact("conversation cleared")
    child.expect_exact(PROMPT)
    answer(child, "hello")
    assert prompt_tokens(child)[0] == first
    child.sendline("/help")
    child.expect_exact("/system TEXT")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_session(tiny):
    # long answers (until the 1024-token context fills) so that Ctrl-C lands mid-answer
    child = spawn("--model", str(tiny), "-n", "5000", "--ctx", "1024", "--temperature", "0")
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story")  # the terminal's echo
    child.expect(r"\n.")  # the first streamed text
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    child.sendline("and then?")
    child.expect(r"decode [\d.]+ tok/s")
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a hint, and the session goes on
    child.expect_exact("Ctrl-D to leave")
    child.sendline("/stats")
    child.expect(r"answers\s+2")
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def run_piped(tiny, text: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localseek", "chat", "--model", str(tiny), "-n", "6"]
        + ["--temperature", "0", *extra],
        input=text,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_piped_stdin_answers_each_line(tiny):
    one = run_piped(tiny, "hello\n")
    two = run_piped(tiny, "hello\nhow are you\n")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert one.stdout.strip()
    # greedy: the first answer is the same, the second turn adds a second answer after it
    assert two.stdout.startswith(one.stdout) and len(two.stdout) > len(one.stdout)
    assert "tok/s" not in two.stdout and ">>>" not in two.stdout  # no interactive frills
    assert "Traceback" not in two.stderr


def test_stats_show_the_expert_tiers_under_a_ram_budget(tiny):
    # 400 KiB holds 8 of each MoE layer's 16 experts (24 KiB each): the rest come from disk
    plain = run_piped(tiny, "hello\n")
    tiered = run_piped(tiny, "hello\n/stats\n", "--ram", "400KiB")
    assert tiered.returncode == 0, tiered.stderr
    assert tiered.stdout.startswith(plain.stdout)  # same greedy answer from the tiers
    disk = re.search(r"disk MiB/token\s+([\d.]+)\s+([\d.]+)", tiered.stdout)
    assert disk and float(disk.group(2)) > 0
    assert re.search(r"RAM hits\s+\d+%", tiered.stdout)
    assert "GPU expert-cache hits" not in plain.stdout


def test_bad_model_paths(tmp_path):
    def chat(path):
        return subprocess.run(
            [sys.executable, "-m", "localseek", "chat", "--model", str(path)],
            input="",
            capture_output=True,
            text=True,
            timeout=120,
        )

    assert_one_sentence_error(chat(tmp_path / "nope"), "no such file")
    assert_one_sentence_error(chat(tmp_path), "not a model folder")
    (tmp_path / "x.txt").write_text("hello")
    assert_one_sentence_error(chat(tmp_path / "x.txt"), "not a model")


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>", "hmm", "</think>", "Yes."],
        ["<thi", "nk>hm", "m</th", "ink>Yes."],
        ["<think>hmm</think>Yes."],
        ["<", "t", "h", "i", "n", "k", ">", "hmm<", "/think", ">Yes", "."],
    ],
)
def test_think_splitter_handles_split_tags(pieces):
    split = ThinkSplitter()
    parts = [p for piece in pieces for p in split.push(piece)] + split.flush()
    merged: list[tuple[str, bool]] = []
    for text, thinking in parts:
        if merged and merged[-1][1] == thinking:
            merged[-1] = (merged[-1][0] + text, thinking)
        else:
            merged.append((text, thinking))
    assert merged == [("hmm", True), ("Yes.", False)]


def test_think_splitter_starts_inside_when_the_prompt_opened_it():
    split = ThinkSplitter(thinking=True)
    assert split.push("step 1</think>answer <th") == [("step 1", True), ("answer ", False)]
    assert split.flush() == [("<th", False)]  # held back as a possible tag, then let go


def test_reasoning_opened_by_the_template_is_dimmed(tiny, tmp_path):
    import json
    import shutil

    r1 = tmp_path / "r1"
    shutil.copytree(tiny, r1)
    cfg_path = r1 / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}"
        "<｜Assistant｜><think>\n"
    )
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    child = spawn("--model", str(r1), "-n", "6", "--temperature", "0")
    child.sendline("hi")
    child.expect(r"decode [\d.]+ tok/s")
    assert "\x1b[2;3m" in child.before  # dim italic: the answer is still inside <think>
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
