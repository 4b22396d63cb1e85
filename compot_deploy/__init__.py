"""compot-deploy: compress Hugging Face transformers with COMPOT under byte budgets.

Heavy libraries (torch, transformers) are imported lazily, so `compot-deploy --help` stays fast.
"""

from .version import __version__  # noqa: F401 - the public version


def load(path):
    """Rebuild a compressed model saved by `compot-deploy compress` (float32, eval mode)."""
    from .storage.artifact import load as _load

    return _load(path)


def compress(model_dir, out, config=None, **kwargs):
    """Compress `model_dir` into `out` with a CompressConfig (defaults when None); returns the report dict."""
    from .config import CompressConfig
    from .compression import compress as _compress

    return _compress(model_dir, out, config or CompressConfig(), **kwargs)
