"""sora_dist/console.py: other libraries' import-time noise is filtered unless verbose."""
import os
import subprocess
import sys

import pytest

# diffusers imports torchao when it is installed; on a CPU install that logs "Failed to load
# ..._C_*.so", torch's pytree deprecation notes and diffusers' own torchao hint.
SCRIPT = """
import sys
from sora_dist.console import quiet_third_party
quiet_third_party(verbose=sys.argv[1] == "1")
from diffusers import AutoencoderKLWan  # noqa: F401
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_import_noise_is_filtered_unless_verbose(verbose):
    pytest.importorskip("torchao")  # the noise comes from torchao's CUDA-only kernels
    env = {k: v for k, v in os.environ.items()
           if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, "1" if verbose else "0"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    noisy = "Failed to load" in r.stderr or "torchao" in r.stderr
    assert noisy == verbose, r.stderr[-2000:]
