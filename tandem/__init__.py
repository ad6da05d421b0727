"""Tandem: disaggregated prefill/decode LLM serving on Ray.

The one import namespace. Its subpackages are the repository's top-level folders
(`tandem.workers` is `workers/`, `tandem.kernels` is `kernels/`, `tandem.loadgen` is
`bench/loadgen/`, ...): `pyproject.toml` maps them into this package in the wheel. A source
checkout keeps them beside this folder, not inside it, so there the same mapping is made here:
`kernels/` has no `__init__.py` (a bare `import kernels` from the repository root must find Hugging
Face's `kernels`, which transformers imports), and setuptools' editable finder cannot serve such a
namespace subpackage, so this package's search path takes in the checkout's root.
"""
from pathlib import Path as _Path

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "kernels").is_dir() and (_checkout / "kernels" / "paged_attention.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (a package's __path__)

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # Lazy: `import tandem.protocol` (the router, the CLI) must not pay for torch and transformers.
    if name in __all__:
        from tandem import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
