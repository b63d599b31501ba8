"""The test runner: imports every tests/test_*.py (or those named on the command line) and calls
each test_*() function in file order. A test fails by raising; one that raises harness.Skip could
not run and is counted as skipped, except under CI (CI=true), where a test that did not run fails.
The last line is 'N passed, N failed, N skipped'."""
import importlib.util
import os
import sys
import time
import traceback

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from harness import Skip  # noqa: E402

in_ci = os.environ.get("CI") == "true"
names = sys.argv[1:] or sorted(f[:-3] for f in os.listdir(here) if f.startswith("test_") and f.endswith(".py"))
passed = failed = skipped = 0
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
        except Skip as why:
            if in_ci:
                failed += 1
                print(f"FAIL {name}.{test_name}: did not run under CI: {why}", flush=True)
            else:
                skipped += 1
                print(f"SKIP {name}.{test_name}: {why}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}.{test_name}\n{traceback.format_exc()}", flush=True)
print(f"{passed} passed, {failed} failed, {skipped} skipped")
sys.exit(1 if failed else 0)
