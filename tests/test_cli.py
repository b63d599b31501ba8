"""The command line of runcpu on the full-vocabulary fixture, against Hugging Face references:
perplexity (HF's nll under the same protocol, relative difference <= 1e-4), chat prompts (ids from
the tokenizer's own chat template), greedy generation (HF's greedy ids, decoded here from
tokenizer.json), sampling determinism, and bad flags and inputs."""
import json
import math
import os
import pty
import shutil
import signal
import struct
import subprocess
import threading

import numpy as np

from harness import FIXTURES, ROOT, RUNCPU, TMP, TOKENIZER, Skip, assert_one_error_line, data_file, export, \
    logits_of, reference, run
from test_model import blank_checkpoint

NAME = "qwen3_fullvocab_bf16"


def bytes_of_ids(ids):
    """HF's decoding of ids, from tokenizer.json alone: byte-level symbols back to bytes."""
    tok = json.load(open(data_file("qwen3-tokenizer/tokenizer.json"), encoding="utf-8"))
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    byte_of, n = {}, 0
    for b in range(256):
        if b in printable:
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + n)] = b
            n += 1
    text_of = {v: k for k, v in tok["model"]["vocab"].items()}
    added = {t["id"]: t["content"].encode() for t in tok["added_tokens"]}
    return b"".join(added[i] if i in added else bytes(byte_of[c] for c in text_of[i]) for i in ids if i in added or i in text_of)


def test_perplexity_matches_hf():
    ref = reference(NAME)
    text = open(data_file("tinyshakespeare.txt"), encoding="utf-8").read()[: ref["ppl_text_bytes"]]
    path = os.path.join(TMP, "ppl.txt")
    open(path, "w", encoding="utf-8").write(text)
    rc, out, err = run([RUNCPU, export(NAME), "-m", "ppl", "-f", path, "-c", str(ref["ppl_ctx"])])
    assert rc == 0, err
    fields = out.split()
    assert len(out.splitlines()) == 1 and fields[0] == "ppl" and fields[2] == "nll" and fields[4] == "tokens", out
    nll, tokens = float(fields[3]), int(fields[5])
    hf_nll = ref["ppl_nll_sum"] / ref["ppl_scored"]
    assert tokens == ref["ppl_scored"], f"scored {tokens} tokens, HF scored {ref['ppl_scored']}"
    rel = abs(nll - hf_nll) / hf_nll
    assert rel <= 1e-4, f"nll {nll} vs HF {hf_nll}: relative difference {rel:.2e}"
    assert abs(float(fields[1]) - math.exp(nll)) <= 1e-5 * math.exp(nll)
    print(f"     ppl nll {nll:.6f} vs HF {hf_nll:.6f} (relative {rel:.1e}) over {tokens} tokens")


def test_chat_prompt_ids_match_template():
    cases = json.load(open(os.path.join(FIXTURES, "chat_ids.json"), encoding="utf-8"))
    model = export(NAME)
    for case in cases:
        msgs = {m["role"]: m["content"] for m in case["messages"]}
        args = [RUNCPU, model, "-m", "chat", "-i", msgs["user"], "-r", str(int(case["enable_thinking"])),
                "-v", "1", "-n", "1", "-t", "0"]
        if "system" in msgs:
            args += ["-y", msgs["system"]]
        rc, _, err = run(args, stdin=b"")
        assert rc == 0, err
        line = next(l for l in err.splitlines() if l.startswith("prompt ids:"))
        ids = [int(t) for t in line.split(":")[1].split()]
        assert ids == case["ids"], f"{case['name']}: ours {ids}\n  template {case['ids']}"
    print(f"     {len(cases)} chat prompts equal to the template's ids")


def test_generate_greedy_text_matches_hf():
    ref = reference(NAME)
    rc, out, err = run([RUNCPU, export(NAME), "-i", "ROMEO:\nWhat light", "-t", "0", "-n", "64", "-v", "1"])
    assert rc == 0, err
    prompt_line = next(l for l in err.splitlines() if l.startswith("prompt ids:"))
    assert [int(t) for t in prompt_line.split(":")[1].split()] == ref["greedy_prompt"]
    ids = ref["greedy"]
    stops = [i for i, t in enumerate(ids) if t in (151643, 151645)]
    expected = bytes_of_ids(ids[: stops[0]] if stops else ids).decode("utf-8", "replace")
    assert out.rstrip("\n") == expected.rstrip("\n"), f"ours {out!r}\nHF   {expected!r}"


def test_sampling_is_seeded():
    model = export(NAME)
    base = [RUNCPU, model, "-i", "ROMEO:", "-n", "24", "-t", "1.0", "-p", "0.9", "-k", "50"]
    a = run(base + ["-s", "7"])[1]
    b = run(base + ["-s", "7"])[1]
    c = run(base + ["-s", "8"])[1]
    assert a == b, "the same seed gave different text"
    assert a != c, "different seeds gave the same 24 sampled tokens"
    greedy = run([RUNCPU, model, "-i", "ROMEO:", "-n", "24", "-t", "0"])[1]
    top1 = run([RUNCPU, model, "-i", "ROMEO:", "-n", "24", "-t", "1.0", "-k", "1", "-s", "3"])[1]
    assert greedy == top1, "top-k 1 differs from greedy"


def test_context_limits():
    model = export(NAME)
    rc, _, err = run([RUNCPU, model, "-i", "word " * 40, "-c", "16"])
    assert_one_error_line(rc, err, "prompt longer than the context")
    rc, out, err = run([RUNCPU, model, "-i", "ROMEO:", "-c", "16", "-n", "1000", "-t", "0"])
    assert rc == 0, err  # -n beyond the context: stops at the context's end


def test_bad_flags_and_inputs():
    model = export(NAME)
    bad_utf8 = os.path.join(TMP, "bad_utf8.txt")
    open(bad_utf8, "wb").write(b"ok \xff\xfe bad")
    cases = {
        "negative temperature": ["-t", "-1"], "top-p zero": ["-p", "0"], "top-p above 1": ["-p", "2"],
        "negative top-k": ["-k", "-1"], "steps not a number": ["-n", "abc"], "context zero": ["-c", "0"],
        "context past the model's": ["-c", "100000"], "unknown flag": ["-q", "1"], "missing value": ["-t"],
        "unknown mode": ["-m", "foo"], "kv dtype": ["-e", "int8"], "thinking 2": ["-r", "2"],
        "long flag": ["--temp", "1"], "min-p above 1": ["-P", "1.5"], "trailing junk": ["-t", "0.5x"],
        "no prompt": ["-m", "generate"], "invalid UTF-8 prompt": ["-i", "ok \udcff".encode("utf-8", "surrogateescape").decode("latin-1")],
        "missing tokenizer": ["-z", os.path.join(TMP, "nope.bin")], "ppl without file": ["-m", "ppl"],
        "ppl of invalid UTF-8": ["-m", "ppl", "-f", bad_utf8], "ppl of a directory": ["-m", "ppl", "-f", TMP],
        "ppl of a missing file": ["-m", "ppl", "-f", os.path.join(TMP, "nope.txt")],
    }
    for what, flags in cases.items():
        args = [RUNCPU, model] + flags
        if what == "invalid UTF-8 prompt":
            args = [os.fsencode(RUNCPU), os.fsencode(model), b"-i", b"ok \xff"]
        rc, _, err = run(args)
        assert_one_error_line(rc, err, what)
    rc, _, err = run([RUNCPU, "-m", "tokenize", "-f", bad_utf8])
    assert_one_error_line(rc, err, "tokenize of invalid UTF-8")
    rc, _, err = run([RUNCPU, "-i", "hi"])
    assert_one_error_line(rc, err, "no model")
    print(f"     {len(cases) + 2} bad invocations rejected with one error line each")


def test_tokenize_mode():
    rc, out, err = run([RUNCPU, "-m", "tokenize", "-i", "Hello world"])
    assert rc == 0 and out == "9707 1879\n", (out, err)


def test_chat_multi_turn_reuses_the_cache():
    """Turn 2 feeds only what follows turn 1 in the cache: the close of the reply, the new user
    message and the assistant header (ids checked against the tokenizer on the same text)."""
    model = export(NAME)
    rc, _, err = run([RUNCPU, model, "-m", "chat", "-r", "0", "-v", "1", "-n", "3", "-t", "0", "-i", "Hi"],
                     stdin="And you?\n".encode())
    assert rc == 0, err
    turns = [[int(t) for t in l.split(":")[1].split()] for l in err.splitlines() if l.startswith("prompt ids:")]
    assert len(turns) == 2, err
    text = "<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    rc, out, err = run([RUNCPU, "-m", "tokenize", "-i", text])
    assert rc == 0 and turns[1] == [int(t) for t in out.split()], (turns[1], out)
    assert turns[1][:2] == [151645, 198] and turns[0][-4:] == [151667, 271, 151668, 271]


def ids_of(text):
    """HF-equal token ids of text (the tokenizer's own tests check that)."""
    path = os.path.join(TMP, "to_tokenize.txt")
    open(path, "wb").write(text.encode("utf-8"))
    rc, out, err = run([RUNCPU, "-m", "tokenize", "-f", path])
    assert rc == 0, err
    return [int(t) for t in out.split()]


def stderr_ids(err, label):
    """Every '<label>: ids' line of stderr (-v 1), as lists."""
    return [[int(t) for t in l.split(":")[1].split()] for l in err.splitlines() if l.startswith(label + ":")]


def test_help():
    for args in (["-h"], ["--help"], [export(NAME), "-h"], ["-m", "ppl", "--help"]):
        rc, out, err = run([RUNCPU] + args)
        assert rc == 0 and out.startswith("usage:") and err == "", (args, rc, err)
        for flag in "miyrtkpPsncfozvaeKh":  # every flag of main()'s switch, and -h
            assert f" -{flag} " in out, f"-{flag} is not in the usage"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Usage\n\n```\n")[1].split("```")[0]
    assert "usage: " + block == out, "README's usage block differs from -h"
    for args in (["-help"], ["--h"], ["-hh"]):
        rc, out, err = run([RUNCPU] + args)
        assert_one_error_line(rc, err, " ".join(args))


def test_tokenizer_found_beside_the_program():
    """Without -z, tokenizer.bin comes from the current directory, else from the program's own directory;
    where neither has one, the error says -z."""
    bin_dir, elsewhere = os.path.join(TMP, "bin"), os.path.join(TMP, "elsewhere")
    for d in (bin_dir, elsewhere):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    program = os.path.join(bin_dir, "runcpu")
    shutil.copy(RUNCPU, program)
    shutil.copy(TOKENIZER, os.path.join(bin_dir, "tokenizer.bin"))
    args = [program, "-m", "tokenize", "-i", "Hello world"]
    r = subprocess.run(args, capture_output=True, cwd=elsewhere, timeout=60)
    assert r.returncode == 0 and r.stdout.decode().split() == [str(i) for i in ids_of("Hello world")], r.stderr
    os.remove(os.path.join(bin_dir, "tokenizer.bin"))
    r = subprocess.run(args, capture_output=True, cwd=elsewhere, timeout=60)
    err = r.stderr.decode()
    assert_one_error_line(r.returncode, err, "no tokenizer.bin anywhere")
    assert "-z" in err and bin_dir in err, err


def test_checks_before_the_model_loads():
    """What needs no model fails first: with a model path that does not exist, the error is about the
    prompt or the file, not the model."""
    missing_model = os.path.join(TMP, "no_such_model.bin")
    bad_utf8 = os.path.join(TMP, "bad_utf8.txt")
    open(bad_utf8, "wb").write(b"ok \xff")
    cases = {"generate without a prompt": ([], "prompt"), "an empty prompt": (["-i", ""], "prompt"),
             "ppl without -f": (["-m", "ppl"], "-f"), "logits without -f": (["-m", "logits"], "-f"),
             "ppl of a missing file": (["-m", "ppl", "-f", os.path.join(TMP, "nope.txt")], "nope.txt"),
             "ppl of a directory": (["-m", "ppl", "-f", TMP], "directory"),
             "logits of a directory": (["-m", "logits", "-f", TMP], "directory"),
             "ppl of invalid UTF-8": (["-m", "ppl", "-f", bad_utf8], "UTF-8"),
             "ids that are not numbers": (["-m", "logits", "-f", bad_utf8], 'token 0 ("ok")')}
    for what, (args, says) in cases.items():
        rc, _, err = run([RUNCPU, missing_model] + args)
        assert_one_error_line(rc, err, what)
        assert says in err and "no_such_model" not in err, f"{what}: {err}"


def test_ppl_targets_inside_the_vocabulary():
    """The last token of a window is only a target: an id past the model's vocabulary there is an error,
    not an out-of-bounds read (vocab-512 fixture, where " hello" is id 23811)."""
    path = os.path.join(TMP, "a_b_hello.txt")
    open(path, "w").write("a b hello")
    ids = ids_of("a b hello")
    assert len(ids) == 3 and max(ids[:2]) < 512 <= ids[2], ids
    rc, out, err = run([RUNCPU, export("qwen3_gqa2_bf16"), "-m", "ppl", "-f", path, "-c", "16"])
    assert_one_error_line(rc, err, "target outside the vocabulary")
    assert f"id {ids[2]} at position 2 " in err and out == "", (out, err)


SMALL = "qwen3_gqa2_bf16"  # vocab 512: the perplexity tests score text made of its tokens, quickly


def small_vocab_text(words, seed=0):
    """Random single letters whose tokens ("a", " b", ...) lie inside SMALL's vocabulary."""
    letters = list("abcdefghlmnoprstvwy")
    return " ".join(np.random.default_rng(seed).choice(letters, words))


def numpy_ppl(model, ids, window):
    """The ppl protocol computed here: windows of `window` tokens, each from an empty cache, log-softmax
    (float64) of logits mode's logits (which test_model checks against HF)."""
    nll, scored = 0.0, 0
    for w in range(0, len(ids) - 1, window):
        chunk = ids[w:w + window]
        logits, _ = logits_of(model, chunk[:-1])
        z = logits.astype(np.float64)
        lse = z.max(1) + np.log(np.exp(z - z.max(1, keepdims=True)).sum(1))
        nll += float((lse - z[np.arange(len(chunk) - 1), chunk[1:]]).sum())
        scored += len(chunk) - 1
    return nll / scored, scored


def ppl_line(out):
    fields = out.split()
    assert len(out.splitlines()) == 1 and fields[0::2] == ["ppl", "nll", "tokens"], out
    return float(fields[3]), int(fields[5])


def test_ppl_first_n_tokens():
    """-n N in ppl mode scores only the text's first N tokens, in the same windows."""
    model = export(SMALL)
    path = os.path.join(TMP, "ppl_n.txt")
    open(path, "w").write(small_vocab_text(400))
    ids = ids_of(open(path).read())
    assert len(ids) == 400 and max(ids) < 512
    for n, window in ((100, 32), (97, 97), (2, 16), (300, 64)):
        rc, out, err = run([RUNCPU, model, "-m", "ppl", "-f", path, "-c", str(window), "-n", str(n)])
        assert rc == 0, err
        nll, tokens = ppl_line(out)
        ref_nll, ref_tokens = numpy_ppl(model, ids[:n], window)
        assert tokens == ref_tokens and abs(nll - ref_nll) <= 1e-5 * ref_nll, (n, window, nll, tokens, ref_nll, ref_tokens)
    rc, _, err = run([RUNCPU, model, "-m", "ppl", "-f", path, "-n", "1"])
    assert_one_error_line(rc, err, "-n 1 in ppl mode")


def test_ppl_reads_stdin_and_fifos():
    model = export(SMALL)
    text = small_vocab_text(3000).encode()
    path = os.path.join(TMP, "ppl_stdin.txt")
    open(path, "wb").write(text)
    args = [RUNCPU, model, "-m", "ppl", "-c", "64"]
    rc, from_file, err = run(args + ["-f", path])
    assert rc == 0, err
    rc, from_stdin, err = run(args + ["-f", "-"], stdin=text)
    assert rc == 0 and from_stdin == from_file, (from_stdin, from_file, err)
    fifo = os.path.join(TMP, "ppl.fifo")
    if os.path.exists(fifo):
        os.remove(fifo)
    os.mkfifo(fifo)
    proc = subprocess.Popen(args + ["-f", fifo], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    with open(fifo, "wb") as f:  # opens once the program opens its end
        for i in range(0, len(text), 1000):  # in pieces: the reader must go to the end, not one read
            f.write(text[i:i + 1000])
            f.flush()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.decode() == from_file, err.decode()
    rc, out, err = run([RUNCPU, "-m", "tokenize", "-f", "-"], stdin="Hello world".encode())
    assert rc == 0 and out.split() == [str(i) for i in ids_of("Hello world")], (out, err)


def test_ppl_progress_on_a_terminal():
    """Progress on one line updated in place (\\r) with the time left when stderr is a terminal; plain
    lines otherwise."""
    model = export(SMALL)
    path = os.path.join(TMP, "ppl_progress.txt")
    open(path, "w").write(small_vocab_text(600))
    args = [RUNCPU, model, "-m", "ppl", "-f", path, "-c", "64"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the terminal closes with the program
            break
        if not data:
            break
        chunks.append(data)
    out = proc.communicate(timeout=120)[0].decode()
    os.close(master)
    tty = b"".join(chunks).decode()
    windows = -(-600 // 64)
    assert proc.returncode == 0 and out.startswith("ppl "), tty
    progress = [l for l in tty.split("\r") if l.startswith("[ppl:")]
    assert len(progress) == windows and all(" s left, " in l for l in progress), repr(tty)
    assert tty.count("\n") == 2, f"progress is not one updating line: {tty!r}"  # the load line, the last update
    rc, _, err = run(args)
    lines = [l for l in err.splitlines() if l.startswith("[ppl:")]
    assert rc == 0 and "\r" not in err and len(lines) == windows, err


def test_ppl_ctrl_c_prints_the_result_so_far():
    """SIGINT stops after the current window: the result over the windows done, exit status 130; equal
    to -n over those tokens."""
    path = os.path.join(TMP, "ppl_ctrl_c.txt")
    open(path, "w").write(small_vocab_text(200000))
    args = [RUNCPU, export(SMALL), "-m", "ppl", "-f", path, "-c", "16"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    for line in proc.stderr:
        if line.startswith(b"[ppl:"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 130, (proc.returncode, err[-500:])
    assert "interrupted" in err, err[-500:]
    _, tokens = ppl_line(out)
    assert tokens % 15 == 0 and 0 < tokens < 200000 // 16 * 15, out  # whole windows of 16 tokens, 15 scored each
    rc, whole_windows, err = run(args + ["-n", str(tokens // 15 * 16)])
    assert rc == 0 and whole_windows == out, (whole_windows, out)


def test_messages():
    model = export(NAME)
    cfg = json.load(open(os.path.join(FIXTURES, NAME, "config.json")))
    rc, out, err = run([RUNCPU, model, "-i", "Hello", "-t", "0", "-n", "5", "-v", "1"])
    assert rc == 0, err
    load = next(l for l in err.splitlines() if l.startswith("[loaded"))
    for says in ("bf16", f"{cfg['num_hidden_layers']} layers", f"dim {cfg['hidden_size']}", f"vocab {cfg['vocab_size']}",
                 f"{cfg['num_attention_heads']} q / {cfg['num_key_value_heads']} kv heads"):
        assert says in load, f"{says!r} not in {load!r}"
    assert stderr_ids(err, "prompt ids") == [ids_of("Hello")] == [[9707]], err
    assert "[prefill: 1 token," in err and "1 tokens" not in err, err
    # stdout: the generated text, then a newline
    generated = stderr_ids(err, "generated ids")[0]
    assert out == bytes_of_ids(generated).decode("utf-8", "replace") + "\n", (out, generated)
    # the context ends it: said on stderr, exit 0
    rc, out, err = run([RUNCPU, model, "-i", "ROMEO:", "-c", "16", "-n", "1000", "-t", "0", "-v", "1"])
    generated = stderr_ids(err, "generated ids")[0]
    assert rc == 0 and len(ids_of("ROMEO:")) + len(generated) == 16, err
    assert "[stopped: the context (16 tokens) is full]" in err and out.endswith("\n"), err
    rc, out, err = run([RUNCPU, model, "-i", "ROMEO:", "-c", "32", "-n", "3", "-t", "0"])
    assert rc == 0 and "context" not in err.split("[prefill")[1], err  # -n ended it: nothing said


def test_run_without_a_gpu():
    """./run (the CUDA build; CI builds it) on a machine without a GPU: one error line that says so."""
    gpu_binary = os.path.join(ROOT, "run")
    if not os.path.exists(gpu_binary):
        raise Skip("./run is not built (make run)")
    rc, out, err = run([gpu_binary, export(NAME), "-i", "Hello", "-n", "2"])
    if rc == 0:
        raise Skip("this machine has a GPU: ./run ran")
    assert_one_error_line(rc, err, "./run without a GPU")
    assert "GPU" in err and "runcpu" in err, err


def test_gpu_shapes_checked_at_load():
    """./run checks the shapes its kernels take when it reads the header, naming the field, before it
    asks for a GPU (so a machine without one sees it too); a shape it takes gets as far as the GPU."""
    gpu_binary = os.path.join(ROOT, "run")
    if not os.path.exists(gpu_binary):
        raise Skip("./run is not built (make run)")
    cases = {"head_dim": dict(head_dim=96), "dim": dict(dim=60), "hidden_dim": dict(hidden_dim=100),
             "vocab_size": dict(vocab_size=500)}
    for field, shape in cases.items():
        path = blank_checkpoint(os.path.join(TMP, f"gpu_shape_{field}.bin"), **shape)
        rc, _, err = run([gpu_binary, path, "-i", "Hello", "-n", "2"])
        assert_one_error_line(rc, err, f"./run with a bad {field}")
        assert f"{field} " in err and "GPU" in err and "no CUDA GPU" not in err, err
    rc, _, err = run([gpu_binary, blank_checkpoint(os.path.join(TMP, "gpu_shape_ok.bin")), "-i", "Hello", "-n", "2"])
    if rc == 0:
        raise Skip("this machine has a GPU: ./run ran")
    assert_one_error_line(rc, err, "./run with good shapes")
    assert "no CUDA GPU" in err, err


def long_context_model():
    """The full-vocabulary fixture exported with max_seq_len 4096 in its header (RoPE has no limit):
    room for a 70 KB message."""
    path = os.path.join(TMP, "fullvocab_4096.bin")
    blob = bytearray(open(export(NAME), "rb").read())
    struct.pack_into("<i", blob, 36, 4096)  # max_seq_len, the 8th int32 after magic and version
    open(path, "wb").write(blob)
    return path


def test_chat_long_and_empty_lines():
    """A line over 64 KB is one message; empty lines send nothing."""
    model = long_context_model()
    line = "x" + " " * 70000 + "y"
    rc, _, err = run([RUNCPU, model, "-m", "chat", "-r", "0", "-v", "1", "-n", "1", "-t", "0", "-c", "1024"],
                     stdin=(line + "\n").encode(), timeout=300)
    assert rc == 0, err[-500:]
    prompts = stderr_ids(err, "prompt ids")
    template = "<|im_start|>user\n" + line + "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert len(prompts) == 1 and prompts[0] == ids_of(template), f"{len(prompts)} messages"
    rc, _, err = run([RUNCPU, export(NAME), "-m", "chat", "-r", "0", "-v", "1", "-n", "3", "-t", "0", "-i", "Hi"],
                     stdin=b"\n\nAnd you?\n\n")
    prompts = stderr_ids(err, "prompt ids")
    assert rc == 0 and len(prompts) == 2 and len([l for l in err.splitlines() if l.startswith("[prefill:")]) == 2, err
    assert prompts[1][:2] == [151645, 198] and prompts[1][2:] == ids_of(
        "<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"), prompts[1]
    rc, out, err = run([RUNCPU, export(NAME), "-m", "chat"], stdin=b"\n\n")
    assert rc == 0 and out == "" and "[prefill" not in err, (out, err)


def test_chat_replies_from_a_pipe_and_a_full_context():
    """Each reply ends with a newline on stdout; a message that no longer fits ends the conversation
    with a message on stderr and exit status 0."""
    model = export(NAME)
    args = [RUNCPU, model, "-m", "chat", "-r", "0", "-v", "1", "-n", "4", "-t", "0", "-i", "Hi"]
    rc, out, err = run(args, stdin=b"And you?\nWell?\n")
    replies = stderr_ids(err, "generated ids")
    assert rc == 0 and len(replies) == 3, err
    assert out == "".join(bytes_of_ids(r).decode("utf-8", "replace") + "\n" for r in replies), (out, replies)
    first = len(stderr_ids(err, "prompt ids")[0]) + len(replies[0])
    rc, out, err = run(args + ["-c", str(first + 10)], stdin=b"And you?\n")  # the second turn needs 20
    assert rc == 0 and "error" not in err and "[the context is full" in err, err
    assert len(stderr_ids(err, "prompt ids")) == 1 and out.count("\n") == 1, (out, err)
