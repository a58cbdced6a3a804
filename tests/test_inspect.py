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


def _inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "localseek", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_counts_the_files_own_tensors(tmp_path):
    """A GGUF expert stack is one tensor: the demo Q8_0 file has 70 (it showed 201, each
    stack counted once per expert)."""
    from collections import Counter

    from gguf import GGUFReader

    from localseek.checkpoint import open_checkpoint
    from localseek.convert.gguf_writer import write_gguf
    from localseek.demo import BUNDLED

    with open_checkpoint(BUNDLED) as ckpt:
        path = write_gguf(ckpt, tmp_path / "demo.gguf", "q8_0")[0]
    proc = _inspect(path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    tensors = GGUFReader(path).tensors
    types = Counter(t.tensor_type.name for t in tensors)
    assert info["tensors"] == len(tensors) == 70
    assert {k: v["tensors"] for k, v in info["tensor_types"].items()} == dict(types)


def test_inspect_missing_tensor_and_expert_count_are_one_sentence(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from localseek.demo import BUNDLED

    folder = tmp_path / "hf"
    shutil.copytree(BUNDLED, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    save_file(state, str(folder / "model.safetensors"))
    proc = _inspect(folder)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        f"localseek: error: {folder}: tensor "
        "'model.layers.1.self_attn.kv_a_proj_with_mqa.weight' is missing."
    )
    config = json.loads((folder / "config.json").read_text())
    del config["n_routed_experts"]
    (folder / "config.json").write_text(json.dumps(config))
    proc = _inspect(folder)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "key 'n_routed_experts' is missing" in lines[0] and "layers.1.ffn.w1" not in lines[0]
