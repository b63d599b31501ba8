"""The command line of runcpu on the full-vocabulary fixture, against Hugging Face references:
perplexity (HF's nll under the same protocol, relative difference <= 1e-4), chat prompts (ids from
the tokenizer's own chat template), greedy generation (HF's greedy ids, decoded here from
tokenizer.json), sampling determinism, and bad flags and inputs."""
import json
import math
import os

import numpy as np

from harness import FIXTURES, RUNCPU, TMP, data_file, assert_one_error_line, export, logits_of, reference, run

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
