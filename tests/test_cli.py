"""`localseek generate` end to end, and bad input: one sentence, non-zero exit, no traceback."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from procs import default_signals


def run(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "localseek", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_sentence_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from localseek.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_generate_streams_text_and_reports_speed(tiny):
    proc = run("generate", "--model", str(tiny), "--prompt", "The old sailor said", "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The old sailor said")
    assert len(proc.stdout.strip()) > len("The old sailor said")
    assert "prefill" in proc.stderr and "decode" in proc.stderr and "tok/s" in proc.stderr


def test_generate_without_model_uses_the_bundled_demo_model():
    proc = run("generate", "--prompt", "Hello", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Hello") and len(proc.stdout.strip()) > len("Hello")


def test_folder_without_config(tmp_path):
    assert_one_sentence_error(
        run("generate", "--model", str(tmp_path), "--prompt", "x"), "no config.json"
    )


def test_path_that_does_not_exist(tmp_path):
    assert_one_sentence_error(
        run("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "no such file"
    )


def test_unsupported_architecture(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert_one_sentence_error(
        run("generate", "--model", str(tmp_path / "m"), "--prompt", "x"),
        "Qwen2ForCausalLM",
        "not supported",
    )


def test_missing_shard(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(
        tmp_path / "m" / "model-00001-of-00002.safetensors"
    )
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_sentence_error(
        run("generate", "--model", str(tmp_path / "m"), "--prompt", "x"),
        "model-00002-of-00002.safetensors",
        "missing",
    )


def test_truncated_safetensors(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_sentence_error(
        run("generate", "--model", str(tmp_path / "m"), "--prompt", "x"),
        "model.safetensors",
        "truncated: its tensors need",
    )


def test_prompt_longer_than_context(tiny):
    proc = run("generate", "--model", str(tiny), "--ctx", "16", "--prompt", "word " * 200)
    assert_one_sentence_error(proc, "prompt has", "context holds 16")


def test_unknown_option_through_the_api(tiny):
    import localseek

    with pytest.raises(localseek.LocalseekError, match="unknown option 'gpu_memory'"):
        localseek.load(tiny, gpu_memory=3)


# --- bad flags: one sentence, before any work --------------------------------------------------


def test_prompt_that_is_not_utf8():
    # Python hands argv bytes that are not UTF-8 over as lone surrogates
    proc = subprocess.run(
        [sys.executable, "-m", "localseek", "generate", "--prompt", b"caf\xe9 au lait"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_sentence_error(proc, "--prompt", "not UTF-8", "byte 0xe9 at character 4")


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--temperature", "nan"], ["--temperature", "finite number >= 0, got nan"]),
        (["--temperature", "inf"], ["--temperature", "finite number >= 0, got inf"]),
        (["--temperature", "-0.5"], ["--temperature", "finite number >= 0, got -0.5"]),
        (["--top-p", "nan"], ["--top-p", "must be in (0, 1], got nan"]),
        (["--seed", str(2**70)], ["--seed", f"must be in [0, 2**64), got {2**70}"]),
        (["--seed", "-1"], ["--seed", "must be in [0, 2**64), got -1"]),
        (["--threads", "0"], ["--threads", "must be at least 1, got 0"]),
    ],
)
def test_sampling_and_thread_flags_out_of_range(flags, needles, capsys):
    from localseek.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_device_that_is_not_available(tiny):
    proc = run("generate", "--model", str(tiny), "--prompt", "x", "--device", "mps")
    assert_one_sentence_error(proc, "device 'mps' is not available", "cpu or cuda")


@pytest.mark.parametrize(
    "command, flag",
    [
        (["bench", "-p", "8", "-n", "4"], "--json"),
        (["perplexity", "--file", "/nonexistent.txt"], "--json"),
        (["profile", "--prompts", "/nonexistent.txt"], "--out"),
    ],
)
def test_output_path_checked_before_the_work(command, flag, tmp_path, capsys):
    from localseek.cli.main import main

    # the model does not exist: the output path is what is said, so it was checked first
    model = ["--model", str(tmp_path / "no-such-model")]
    assert main([*command, *model, flag, str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"localseek: error: {flag} {tmp_path}: is a folder; give the name of a file to write."
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main([*command, *model, flag, str(a_file / "out.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{flag} {a_file / 'out.json'}: {a_file} is a file, not a folder." in err, err
    assert len(err.splitlines()) == 1


def test_threads_above_the_usable_cores_are_capped(tiny):
    from localseek.options import usable_cores

    proc = run("generate", "--model", str(tiny), "--prompt", "x", "-n", "2", "-t", "999")
    assert proc.returncode == 0, proc.stderr
    notice = (
        f"localseek: --threads 999 is more than the {usable_cores()} cores this process may use; "
        f"using {usable_cores()}."
    )
    assert proc.stderr.splitlines().count(notice) == 1, proc.stderr


SLOW_TORCH = r"""
import sys, time

class SlowTorch:  # torch's import, held long enough to be interrupted in
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(120)
        return None

sys.meta_path.insert(0, SlowTorch())
from localseek.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_torch_imports():
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TORCH, "generate", "--prompt", "x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_signals,
    )
    assert proc.stdout.readline() == "importing torch\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "localseek: interrupted\n"


# --- help -------------------------------------------------------------------------------------

LIGHT_HELP = [
    "",
    "generate",
    "chat",
    "bench",
    "perplexity",
    "quantize",
    "inspect",
    "plan",
    "profile",
    "serve",
]
NO_TORCH = r"""
import sys
from localseek.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "numba") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("command", LIGHT_HELP)
def test_help_imports_neither_torch_nor_numba(command):
    args = [command, "--help"] if command else ["--help"]
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: localseek" in proc.stdout
    assert proc.stderr.strip() == "[]"


def test_every_flag_has_help_and_defaults_are_shown(capsys):
    from localseek.cli.main import COMMANDS, build_parser, main

    parser = build_parser("*")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "tokens to generate (default: 128)",
        "0 means greedy (default: 0.0)",
        "(0: no limit) (default: 0)",
        "(1: all) (default: 1.0)",
        "(cpu, cuda, cuda:N) (default: cpu)",
    ):
        assert shown in text
