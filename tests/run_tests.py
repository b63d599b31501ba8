"""The test runner: imports every tests/test_*.py (or those named on the command line) and calls
each test_*() function in file order. A test fails by raising; the last line is 'N passed, N failed'."""
import importlib.util
import os
import sys
import time
import traceback

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
names = sys.argv[1:] or sorted(f[:-3] for f in os.listdir(here) if f.startswith("test_") and f.endswith(".py"))
passed = failed = 0
for name in names:
    spec = importlib.util.spec_from_file_location(name, os.path.join(here, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [(k, v) for k, v in vars(module).items() if k.startswith("test_") and callable(v)]
    for test_name, fn in tests:
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"ok   {name}.{test_name} ({time.time() - start:.1f} s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}.{test_name}\n{traceback.format_exc()}", flush=True)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
