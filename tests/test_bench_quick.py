"""Every benchmark script runs in --quick mode and writes JSON with the keys its readers expect.

The scripts are run as users run them (a subprocess from the repository root), so a benchmark
that no longer matches the code it measures fails here instead of rotting. Timings are never
asserted: the shared 2-core machines are too noisy for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> keys its JSON must hold; `markdown` when it also writes <name>.md beside the JSON.
CASES = {
    "bench/inference_overhead.py": {"keys": {"benchmark", "models", "sizes", "batches", "beyond_100k", "at_10k",
                                             "machine"}, "markdown": True},
    "bench/daemon_throughput.py": {"keys": {"benchmark", "facts", "summary", "target", "machine"}, "markdown": True},
    "bench/snapshot_costs.py": {"keys": {"benchmark", "rows", "ratios", "target", "machine"}, "markdown": True},
    "bench/storage.py": {"keys": {"benchmark", "final_entries", "blob_bytes", "materialise_seconds", "machine"},
                         "markdown": False},
    "bench/edit_timing.py": {"keys": {"benchmark", "models", "machine", "quick"}, "markdown": False},
    "bench/serve_throughput.py": {"keys": {"benchmark", "in_process", "server", "targets", "machine"},
                                  "markdown": False},
    "bench/console_pages.py": {"keys": {"benchmark", "pages", "versions", "machine"}, "markdown": False},
    "bench/lookup_index.py": {"keys": {"benchmark", "machine"}, "markdown": False},
    "bench/version_loads.py": {"keys": {"benchmark", "rows", "per_entry_us", "machine"}, "markdown": True},
    "bench/edit_variants.py": {"keys": {"benchmark", "runs", "spliced_total", "probes_total", "machine"},
                               "markdown": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_mode_writes_json(script, tmp_path):
    out = tmp_path / (Path(script).stem + ".json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    expected = CASES[script]
    assert expected["keys"] <= set(report), f"missing {sorted(expected['keys'] - set(report))}"
    assert report["benchmark"] == Path(script).stem
    assert report.get("quick") is True
    assert report["machine"]["cpus"] == os.cpu_count()
    if expected["markdown"]:
        assert out.with_suffix(".md").read_text().startswith("# ")


def test_every_case_is_a_script():
    assert all((ROOT / script).is_file() for script in CASES)
