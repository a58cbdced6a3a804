"""`localseek inspect`: types, sizes and bytes per token, computed independently here."""

import json
import subprocess
import sys

from safetensors import safe_open


def test_inspect_json_counts_bytes_and_per_token_reads(v3_model):
    path, ref = v3_model
    proc = subprocess.run(
        [sys.executable, "-m", "localseek", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    cfg = ref.config
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_tensor(k).numel() * 4 for k in f.keys()}  # noqa: SIM118
    experts = sum(v for k, v in sizes.items() if ".mlp.experts." in k)
    embed = sizes["model.embed_tokens.weight"]
    assert info["total_bytes"] == sum(sizes.values())
    assert info["tensor_types"] == {"F32": {"tensors": len(sizes), "bytes": sum(sizes.values())}}
    assert info["routed_expert_bytes"] == experts
    per_expert = experts // (cfg.n_routed_experts * (cfg.num_hidden_layers - 1))
    per = info["bytes_per_token"]
    assert per["routed_experts"] == per_expert * cfg.num_experts_per_tok * 2  # 2 MoE layers
    assert per["attention_and_shared"] == sum(sizes.values()) - experts - embed + embed // 160
    assert info["moe_layers"] == 2 and info["dense_layers"] == 1


def test_inspect_table_renders(v3_model):
    proc = subprocess.run(
        [sys.executable, "-m", "localseek", "inspect", str(v3_model[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "deepseek_v3" in proc.stdout and "bytes read per decoded token" in proc.stdout


def test_inspect_reads_gguf_types_and_sizes(tmp_path):
    from gguf import GGUFReader

    from localseek.checkpoint import open_checkpoint
    from localseek.convert.gguf_writer import write_gguf
    from localseek.demo import build_tiny_model

    with open_checkpoint(build_tiny_model(tmp_path / "hf")) as ckpt:
        write_gguf(ckpt, tmp_path / "m.gguf", "q8_0")
    proc = subprocess.run(
        [sys.executable, "-m", "localseek", "inspect", str(tmp_path / "m.gguf"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    tensors = GGUFReader(tmp_path / "m.gguf").tensors
    assert info["total_bytes"] == sum(int(t.n_bytes) for t in tensors)
    assert "Q8_0" in info["tensor_types"]
    stacks = sum(int(t.n_bytes) for t in tensors if "_exps" in t.name)
    assert info["routed_expert_bytes"] == stacks
