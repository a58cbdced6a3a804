"""Thread count and OpenMP wait policy: from the cores this process may use and the work
beside it (speed itself is measured by benchmarks/threads.py, never here)."""

import os
import subprocess
import sys

import torch

from localseek.options import busy_cpus, choose_openmp_wait_policy, set_threads, usable_cores


def test_usable_cores_follow_the_affinity_mask():
    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))  # a cgroup quota may lower it
    one_cpu = sorted(os.sched_getaffinity(0))[:1]
    out = subprocess.run(
        [sys.executable, "-c", "from localseek.options import usable_cores; print(usable_cores())"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, one_cpu),
    )
    assert out.stdout.strip() == "1"


def test_wait_policy_spins_only_when_no_other_work_is_seen():
    env: dict[str, str] = {}
    assert choose_openmp_wait_policy(env, busy=lambda: 0.1).startswith("spin")
    assert env == {"GOMP_SPINCOUNT": "30000"}
    env = {}
    assert choose_openmp_wait_policy(env, busy=lambda: 1.0).startswith("passive")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    choose_openmp_wait_policy(env, busy=lambda: None)  # /proc/stat unreadable
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"GOMP_SPINCOUNT": "1000"}
    assert choose_openmp_wait_policy(env, busy=lambda: 0.0) == "kept from the environment"
    assert env == {"GOMP_SPINCOUNT": "1000"}


def test_a_busy_process_is_seen_and_localseek_then_sleeps_its_waiters():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cpus(0.3) >= 0.5
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        out = subprocess.run(
            [sys.executable, "-c", "import os, localseek; print(os.environ['OMP_WAIT_POLICY'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            env=env,
        )
        assert out.stdout.strip() == "PASSIVE"
    finally:
        hog.kill()
        hog.wait()


def test_threads_default_to_the_usable_cores_and_are_capped_to_them():
    before = torch.get_num_threads()
    try:
        assert set_threads(None) == usable_cores() == torch.get_num_threads()
        assert set_threads(10_000) == usable_cores()
        assert set_threads(1) == 1 == torch.get_num_threads()
    finally:
        set_threads(before)
