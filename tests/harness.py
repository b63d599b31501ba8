"""What the tests share: paths, the committed data, running the binary, exporting fixtures,
error-line checks, skips."""
import json
import lzma
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TMP = os.path.join(ROOT, "tests", "tmp")
RUNCPU = os.path.join(ROOT, os.environ.get("RUNCPU", "runcpu"))
TOKENIZER = os.path.join(ROOT, "tokenizer.bin")
shutil.rmtree(TMP, ignore_errors=True)  # every run exports afresh
os.makedirs(TMP)


class Skip(Exception):
    """Raised by a test that could not run: counted apart from passes (and as a failure under CI)."""


def data_file(name):
    """A file of the repo's data/ folder (e.g. "tinyshakespeare.txt", "qwen3-tokenizer/tokenizer.json"),
    decompressed into tests/tmp/data the first time when it is committed as NAME.xz."""
    path = os.path.join(ROOT, "data", name)
    if os.path.exists(path):
        return path
    out = os.path.join(TMP, "data", name)
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with lzma.open(path + ".xz") as f:
            data = f.read()
        with open(out + ".part", "wb") as f:
            f.write(data)
        os.replace(out + ".part", out)
    return out


def run(args, stdin=None, timeout=120):
    """Runs a command; returns (returncode, stdout, stderr) as text."""
    r = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout, cwd=ROOT)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def export(name, dtype=None):
    """A fixture (or, given an absolute path, any model folder) exported to tests/tmp, once per
    dtype; returns the .bin path."""
    source = name if os.path.isabs(name) else os.path.join(FIXTURES, name)
    out = os.path.join(TMP, f"{os.path.basename(source)}.{dtype or 'own'}.bin")
    if not os.path.exists(out):
        args = [sys.executable, os.path.join(ROOT, "export.py"), source, out]
        rc, _, err = run(args + (["--dtype", dtype] if dtype else []))
        assert rc == 0, f"export of {name} failed: {err}"
    return out


def reference(name):
    return json.load(open(os.path.join(FIXTURES, name, "ref.json")))


def write_ids(ids, path=None):
    path = path or os.path.join(TMP, "ids.txt")
    open(path, "w").write(" ".join(map(str, ids)))
    return path


def logits_of(model, ids, greedy=0):
    """Our logits for every position fed, and the greedy continuation printed."""
    out = os.path.join(TMP, "logits.bin")
    rc, stdout, err = run([RUNCPU, model, "-m", "logits", "-f", write_ids(ids), "-o", out, "-n", str(greedy)])
    assert rc == 0, f"{model}: {err}"
    vocab = np.fromfile(out, dtype=np.float32)
    return vocab.reshape(len(ids) + greedy, -1), [int(t) for t in stdout.split()]


def assert_one_error_line(rc, err, what):
    """Bad input: a clean non-zero exit (no signal, no sanitizer report) whose stderr ends with
    exactly one line, starting 'error: ' (progress lines before it are allowed)."""
    lines = err.strip().splitlines()
    assert rc > 0, f"{what}: exit code {rc} (expected a clean non-zero exit); stderr: {err[-500:]}"
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Sanitizer" not in err, \
        f"{what}: expected one final 'error:' line, got: {err[-500:]!r}"
