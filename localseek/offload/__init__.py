"""Where routed experts live and how they are computed: the CPU expert executor so far."""

from localseek.offload.cpu_experts import CPUExperts, expert_executor

__all__ = ["CPUExperts", "expert_executor"]
