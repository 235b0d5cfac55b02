"""The machine a run was made on: its name for the results files, and what a reader needs to know
of it (device, torch, load)."""

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device):
    if device == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name())
    model = re.sub(r"\((r|tm)\)|\bcpu\b|@.*", "", cpu_model(), flags=re.I)
    return f"cpu-{_slug(model)}-{torch.get_num_threads()}t"


def device_text(device):
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"driver {_driver_version()}, CUDA {torch.version.cuda}")
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device, settings):
    try:
        import dqa_ext

        info = {**dqa_ext.backend_info(), "benchmarked_backend": "extension (forced for each benchmark)"}
    except Exception as exc:  # report it rather than lose the results
        info = {"error": repr(exc)}
    return {"machine": machine_name(device), "device": device_text(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": _loadavg(), "dqa_ext": info, **settings}


def _busy(env):
    """Other work ran: load before the suite started, or beyond the suite's own threads at its end."""
    start, end = (env.get("load_start") or [0])[0], (env.get("load_average") or [0])[0]
    return start > 0.7 or end > torch.get_num_threads() + 0.7


def _loadavg():
    """1/5/15-minute load averages at the end of the run: timings on a busy machine are noisy."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
