"""kdaverify: a reference oracle, a conformance suite and kernels for Kimi Delta Attention.

One import namespace over the repository's folders (setuptools maps them, pyproject.toml):

    kdaverify.reference     the oracle (NumPy float64 and PyTorch recurrences, chunkwise WY/UT)
    kdaverify.kernels       Triton kernels
    kdaverify.equivalence   the conformance suite, its pytest plugin and the negative controls
    kdaverify.perf          roofline performance sweeps

The `kdaverify` command (kdaverify.cli) runs the suite, the oracle's self-check and the kill
table; `pytest --kda-impl=MODULE:FUNC` runs the suite from any project.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdaverify")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
