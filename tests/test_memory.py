"""Loading is memory-mapped and tensor by tensor: peak RSS grows by little more than the
bytes of the weights kept."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from localseek.demo import _TINY_CONFIG, random_state

# Peak RSS is the kernel's VmHWM of this process (ru_maxrss would carry over the parent's peak
# across fork and exec).
PROBE = r"""
import json, sys
import psutil, torch, localseek
import localseek.engine  # the code's own modules (numba, llvmlite: 70+ MB) are not weights

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

rss0 = psutil.Process().memory_info().rss
assert peak_rss() - rss0 < 64 << 20  # nothing before loading inflates the peak
model = localseek.load(sys.argv[1])
peak = peak_rss()
print(json.dumps({"rss0": rss0, "peak": peak, "kept": model.weights_nbytes()}))
"""


def test_loading_a_200mb_checkpoint_peaks_below_1_3x_the_weights_kept(tmp_path):
    cfg = {
        **_TINY_CONFIG,
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "kv_lora_rank": 256,
        "q_lora_rank": 384,
    }
    state = {k: v.to(torch.bfloat16) for k, v in random_state(cfg, seed=0).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    del state
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 180e6 < size < 260e6
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    m = json.loads(out.stdout)
    assert 1.9 * size < m["kept"] <= 2 * size  # bf16 on disk, float32 in memory
    growth = m["peak"] - m["rss0"]
    assert growth <= 1.3 * m["kept"], (growth / 2**20, m["kept"] / 2**20)
