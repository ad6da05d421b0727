"""Makes the worker-process harness (kv_procs.py) importable by tests and by the worker
processes they start (multiprocessing hands sys.path to its children)."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
