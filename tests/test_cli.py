"""`localseek generate` end to end, and bad input: one sentence, non-zero exit, no traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest


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
        "truncated or corrupt",
    )


def test_prompt_longer_than_context(tiny):
    proc = run("generate", "--model", str(tiny), "--ctx", "16", "--prompt", "word " * 200)
    assert_one_sentence_error(proc, "prompt has", "context holds 16")


def test_unknown_option_through_the_api(tiny):
    import localseek

    with pytest.raises(localseek.LocalseekError, match="unknown option 'gpu_memory'"):
        localseek.load(tiny, gpu_memory=3)
