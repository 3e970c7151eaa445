"""What every benchmark records about the machine it ran on (imported by the scripts in bench/)."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_facts(**extra: Any) -> dict[str, Any]:
    """CPU count, torch threads and version, platform, Python, load average, plus `extra`."""
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
        **extra,
    }
