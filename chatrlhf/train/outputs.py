"""What a stage leaves behind besides its checkpoints: the trained model directories, and summary.json with the
versions and machine it ran on."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from chatrlhf import distributed as dist
from chatrlhf.engine.base import TrainEngine
from chatrlhf.models.load import ValueModel, save_model_dir, save_value_model
from chatrlhf.models.lora import is_lora
from chatrlhf.models.lora import save_trained as save_lora


def save_trained(engine: TrainEngine, tok, out: Path, name: str = "model") -> None:
    """Write the engine's model as a Hugging Face directory `out/<name>` (LoRA: merged, plus `<name>_adapter/`);
    under ZeRO-3 every rank takes part in gathering the weights, the main rank writes."""
    if is_lora(engine.module):
        if dist.is_main():
            save_lora(engine.module, tok, out, name)
    else:
        state = engine.full_state_dict()
        if dist.is_main():
            if isinstance(engine.module, ValueModel):
                save_value_model(engine.module, tok, out / name, state_dict=state)
            else:
                save_model_dir(engine.module, tok, out / name, state_dict=state)
    dist.barrier()


class Stopwatch:
    """Wall seconds since it was made."""

    def __init__(self) -> None:
        self.start = time.time()

    def elapsed(self) -> float:
        return time.time() - self.start


def environment() -> dict[str, str | int]:
    """The versions and machine a run's figures come from (`env/*` in summary.json): results are reproducible
    given the seed on the same machine type with the same versions, not across them."""
    import transformers

    from chatrlhf import __version__

    info = cpuinfo()
    env: dict[str, str | int] = {
        "env/chatrlhf": __version__,
        "env/python": platform.python_version(),
        "env/torch": torch.__version__,
        "env/transformers": transformers.__version__,
        "env/platform": platform.platform(),
        "env/cpu": cpu_name(info),
        "env/cpu_id": cpu_id(info),
        "env/cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env/cpu_count": os.cpu_count() or 0,
        "env/torch_threads": torch.get_num_threads(),
        "env/world_size": dist.world_size(),
    }
    if torch.cuda.is_available():
        env["env/gpu"] = torch.cuda.get_device_name()
        env["env/cuda"] = str(torch.version.cuda)
    return env


def cpuinfo() -> str:
    """/proc/cpuinfo's text; "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name(info: str) -> str:
    """The CPU model name (from /proc/cpuinfo's text on Linux; `platform.processor()` elsewhere)."""
    for line in info.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_id(info: str) -> str:
    """The first CPU's family, model and stepping from /proc/cpuinfo's text (x86; e.g. "family 26 model 2 stepping
    1"), which tell apart CPU generations that share a model name such as "AMD EPYC"; "unknown" where not listed."""
    fields = {}
    for line in info.splitlines():
        if not line.strip():
            break  # the end of the first CPU's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not all(fields.get(k) for k in ("cpu family", "model", "stepping")):
        return "unknown"
    return f"family {fields['cpu family']} model {fields['model']} stepping {fields['stepping']}"


def write_summary(path: Path, summary: dict) -> None:
    """Add the environment it ran in (`env/*`) to `summary`, and write it as summary.json on the main rank."""
    summary.update(environment())
    if dist.is_main():
        write_json(path, summary)


def write_json(path: Path, data: dict) -> None:
    """Write strict JSON atomically; a non-finite number (e.g. the loss of a skipped step) is written as null."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
