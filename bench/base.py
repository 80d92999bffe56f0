"""python -m bench.base MODULE [ARGS...]: run MODULE with magne imported from $BENCH_MAGNE_BASE.

For before/after figures in one run (the magne-base peers). The bench's venv installs this
checkout editable, and setuptools' editable finder sits in sys.meta_path, ahead of every
sys.path entry: PYTHONPATH alone never reaches the other checkout (the earlier magne-base
peer ran the current code). So the finder is taken out and the base checkout put first.
"""

import os
import runpy
import sys

base = os.environ["BENCH_MAGNE_BASE"]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path.insert(0, base)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
