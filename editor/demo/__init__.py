"""The shipped demo vision-language model: a tiny LLaVA (CLIP vision + Llama text) trained on easy-VQA.

The checkpoint lives in :data:`DEMO_MODEL_DIR`; ``python -m editor.demo.train --out editor/demo/model``
rebuilds it (see :mod:`editor.demo.train`). This module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "model"
