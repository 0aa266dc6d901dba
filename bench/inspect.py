"""bench/inspect.py: samprobe inspect against its baseline; the code is in bench/inspect_run.py.

This file is named like the standard library's inspect, which numpy, torch and dataclasses
import: another script in bench/ (whose folder is then sys.path[0]) importing them would get
this file. Imported under that name, it hands the importer the real module; run, it runs the bench.
"""

import importlib.util
import os
import sys

if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.util.spec_from_file_location(
        "inspect_run", os.path.join(_here, "inspect_run.py")
    )
    _bench = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bench)
    _bench.main()
else:  # imported as `inspect`: the importer gets the standard library's module (it replaces this one)
    _spec = importlib.util.spec_from_file_location(
        "inspect", os.path.join(os.path.dirname(os.__file__), "inspect.py")
    )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["inspect"] = _real
    _spec.loader.exec_module(_real)
