"""export.py's command line: every error is one 'error:' line and exit 1, checked before any work starts.
(The model and tokenizer exports themselves are tested in test_model.py and test_tokenizer.py.)"""
import os
import sys

from harness import FIXTURES, ROOT, TMP, assert_one_error_line, run

EXPORT = os.path.join(ROOT, "export.py")


def export_error(args, what, python_code=None):
    """Runs export.py with args (through python_code, given the path and args, when set); returns its one
    error line."""
    command = [sys.executable, "-c", python_code, EXPORT] if python_code else [sys.executable, EXPORT]
    rc, out, err = run(command + args)
    assert_one_error_line(rc, err, what)
    assert rc == 1 and not out, f"{what}: exit {rc}, stdout {out!r}"
    return err.strip()


def test_without_numpy():
    """A Python without numpy is told what to install, in one line."""
    no_numpy = ("import runpy, sys; sys.modules['numpy'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    line = export_error([os.path.join(FIXTURES, "qwen3_gqa2_bf16"), os.path.join(TMP, "x.bin")], "no numpy", no_numpy)
    assert "numpy" in line and "install" in line, f"no numpy: {line!r} does not say what to install"


def test_usage_errors_one_line():
    """argparse's own errors print the usage and the error (two lines, exit 2)."""
    for args, what in [([], "no arguments"), (["model_dir"], "no output"), (["a", "b", "--dtype", "int4"], "bad dtype"),
                       (["a", "b", "--bogus"], "unknown flag"), (["a", "b", "c"], "extra argument")]:
        line = export_error(args, what)
        assert "-h" in line, f"{what}: {line!r} does not point at -h"
    rc, out, err = run([sys.executable, EXPORT, "-h"])
    assert rc == 0 and "usage" in out and not err, f"-h: exit {rc}, stderr {err!r}"


def test_bad_paths():
    out = os.path.join(TMP, "export_test.bin")
    missing = os.path.join(TMP, "no_such_model")
    line = export_error([missing, out], "missing folder")
    assert f"{missing}: no such folder" in line, f"missing folder: {line!r}"
    config = os.path.join(FIXTURES, "qwen3_gqa2_bf16", "config.json")
    assert f"{config}: not a folder" in export_error([config, out], "a file for the folder")
    for args, what in [([os.path.join(FIXTURES, "qwen3_gqa2_bf16"), TMP], "model output is a directory"),
                       (["--tokenizer", os.path.join(ROOT, "demo", "tokenizer.json"), TMP], "tokenizer output is a directory")]:
        line = export_error(args, what)
        assert f"{TMP}: is a directory" in line, f"{what}: {line!r}"
    assert not os.path.exists(TMP + ".tmp"), "an output that is a directory left a partial file beside it"
    line = export_error(["--tokenizer", os.path.join(TMP, "no_such_tokenizer.json"), out], "missing tokenizer.json")
    assert "no_such_tokenizer.json" in line, f"missing tokenizer.json: {line!r}"
