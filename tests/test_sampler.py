"""The sampler against Hugging Face's warpers, with the statistical power to see any one of them broken.

A synthetic checkpoint gives the same logits at every step: every layer matrix is zero, so attention
and the MLP add nothing and the residual stream stays the embedding row (all rows equal), and the
untied lm_head sets the logits. One `generate` run then draws N tokens from one fixed distribution.
The reference is HF generate's warpers in its order (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, MinPLogitsWarper), written from their definitions in float64 on the float32 logits
runcpu computes (-m logits). A case passes when no draw falls outside HF's support and Pearson's
chi-square test of the counts against HF's probabilities gives a p-value >= ALPHA.

The cases are chosen so that every filter changes the result: temperature reshapes, top-k cuts,
top-p cuts what top-k left, min-p cuts what top-p left. The same test applied to the same draws must
reject the distribution of each broken sampler (one filter ignored, the wrong temperature, top-p
before top-k, top-p without renormalising after top-k), or the test could not tell them apart.

Error rates (computed once, for these logits and cases): a correct sampler fails a case with
probability about ALPHA (the exact multinomial tail beyond the critical value is 1.04e-7 in the
3-token case and 1.09e-7 in the 4-token one; simulation puts the 8-token case's at 1.11e-5 for a
nominal 1e-5), so the suite's false alarm stays below 1e-6. Each broken sampler passes with
probability far below 1e-6: in some case it puts >= 11% of its mass outside HF's support (no such
draw in 4000: < 1e-200), or, with the temperature ignored (which only narrows the support), its
chi-square statistic gets a noncentrality >= 405 (8-token case; critical value 45.7 at 7 degrees
of freedom)."""
import math
import os

import numpy as np

from harness import RUNCPU, TMP, logits_of, run
from test_model import blank_checkpoint, checkpoint

VOCAB, DIM = 64, 8
# lm_head's column 0: the logits up to the final RMSNorm's scale. Twelve distinct head tokens, then a
# tail of 52 whose mass (19% at T 1.5) is what a missing filter lets through.
LOGITS = np.concatenate([[4.0, 3.3, 2.7, 2.0, 1.4, 0.9, 0.4, 0.0, -0.4, -0.8, -1.2, -1.6],
                         -2.0 - 0.02 * np.arange(VOCAB - 12)])
# (temperature, top_k, top_p, min_p): the filters that cut in each case, with HF's support sizes
# 64 -> top-k -> top-p -> min-p: 64, 8, 8, 8 / 64, 9, 3, 3 / 64, 10, 6, 4; the last two catch a top-p
# that renormalised over only the tokens left after a probability cutoff (top-k off), and a min-p
# applied before top-p (both in run.c until 2026-11-22)
CASES = [(1.5, 8, 1.0, 0.0), (1.5, 9, 0.7, 0.0), (1.5, 10, 0.9, 0.25), (1.5, 0, 0.7, 0.0), (1.5, 20, 0.6, 0.1)]
DRAWS = 4000  # per case; the context holds the prompt and every draw
ALPHA = 1e-7  # p-value threshold per case


def write_checkpoint(path, logits):
    """A float32 model.bin whose every step has these logits (times the final RMSNorm's
    1 / sqrt(1 + eps)): zero layers, every embedding row the same, an untied lm_head whose column 0
    holds them."""
    blank_checkpoint(path, dim=DIM, hidden_dim=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8,
                     vocab_size=VOCAB, max_seq_len=DRAWS + 16, flags=0)  # untied, no QK-norm, no bias
    _, tensors, blob = checkpoint(path)
    tensors["embedding"][:] = 1
    tensors["lm_head"][:, 0] = logits
    blob.tofile(path)
    return path


# HF's warpers on float64 scores (a removed token's score is -inf), from their definitions.
def softmax(scores):
    p = np.exp(scores - scores.max())
    return p / p.sum()


def top_k(scores, k):  # TopKLogitsWarper: drops the scores below the k-th largest
    if k == 0:
        return scores
    return np.where(scores < np.sort(scores)[-min(k, len(scores))], -np.inf, scores)


def top_p(scores, p, probs=None):
    """TopPLogitsWarper: drops the least likely tokens while their ascending cumulative probability
    (of the scores', or of probs where given) stays <= 1 - p; never the most likely one."""
    if p >= 1:
        return scores
    probs = softmax(scores) if probs is None else probs
    order = np.argsort(probs, kind="stable")
    remove = np.cumsum(probs[order]) <= 1 - p
    remove[-1] = False
    out = scores.copy()
    out[order[remove]] = -np.inf
    return out


def min_p(scores, m):  # MinPLogitsWarper: drops the tokens less likely than m times the top one
    probs = softmax(scores)
    return np.where(probs < m * probs.max(), -np.inf, scores)


def hf_probs(logits, temperature, k, p, m):
    """The next-token distribution of HF's generate: temperature, top-k, top-p, min-p."""
    return softmax(min_p(top_p(top_k(logits.astype(np.float64) / temperature, k), p), m))


def top_p_not_renormalised(logits, temperature, k, p, m):
    """top-p reading the probabilities before top-k (the top-k survivors' mass is not rescaled to 1)."""
    scores = logits.astype(np.float64) / temperature
    kept = top_k(scores, k)
    return softmax(min_p(top_p(kept, p, probs=softmax(scores)), m))


def top_p_before_top_k(logits, temperature, k, p, m):
    return softmax(min_p(top_k(top_p(logits.astype(np.float64) / temperature, p), k), m))


# Samplers with one thing wrong: the draws must reject each one's distribution.
BROKEN = {
    "min-p ignored": lambda logits, t, k, p, m: hf_probs(logits, t, k, p, 0.0),
    "top-p ignored": lambda logits, t, k, p, m: hf_probs(logits, t, k, 1.0, m),
    "top-k ignored": lambda logits, t, k, p, m: hf_probs(logits, t, 0, p, m),
    "temperature 2.0 for 1.5": lambda logits, t, k, p, m: hf_probs(logits, 2.0, k, p, m),
    "temperature ignored": lambda logits, t, k, p, m: hf_probs(logits, 1.0, k, p, m),
    "top-p before top-k": top_p_before_top_k,
    "top-p not renormalised after top-k": top_p_not_renormalised,
}


def chi2_sf(x, df):
    """P(chi-square with df degrees of freedom > x): the regularized upper incomplete gamma
    Q(df/2, x/2), by its power series below a + 1 and its continued fraction above (modified Lentz),
    as in Numerical Recipes 6.2."""
    a, x = df / 2, x / 2
    if x <= 0:
        return 1.0
    front = math.exp(a * math.log(x) - x - math.lgamma(a))  # x^a e^-x / Gamma(a)
    if x < a + 1:  # P(a, x) = front * sum_n x^n / (a (a + 1) ... (a + n))
        term = total = 1 / a
        n = 0
        while term > total * 1e-16:
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1 - front * total)
    # Q(a, x) = front / (x + 1 - a - 1 (1 - a) / (x + 3 - a - 2 (2 - a) / (x + 5 - a - ...)))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return front * h


def p_value(counts, probs):
    """How likely counts at least this far from probs are: 0 when a draw falls outside the support,
    else Pearson's chi-square over the support (support size - 1 degrees of freedom)."""
    support = probs > 0
    if counts[~support].any():
        return 0.0
    expected = counts.sum() * probs[support]
    return chi2_sf(((counts[support] - expected) ** 2 / expected).sum(), support.sum() - 1)


def test_chi2_sf_matches_closed_forms():
    """The survival function against its closed forms: erfc for 1 and 3 degrees of freedom, the
    Poisson sum e^-y sum_{i<k} y^i / i! (y = x/2) for 2k."""
    for x in (0.5, 3.0, 12.0, 40.0, 90.0):
        y = x / 2
        forms = {1: math.erfc(math.sqrt(y)), 3: math.erfc(math.sqrt(y)) + math.sqrt(4 * y / math.pi) * math.exp(-y)}
        for k in (1, 2, 5, 12):
            forms[2 * k] = math.exp(-y) * sum(y ** i / math.factorial(i) for i in range(k))
        for df, expected in forms.items():
            assert abs(chi2_sf(x, df) - expected) <= 1e-12 * expected + 1e-300, (x, df, chi2_sf(x, df), expected)


def sampled_ids(model, case, seed):
    """DRAWS tokens sampled after the prompt "!" (token 0) in one run."""
    temperature, k, p, m = case
    # one OpenMP thread: on a model this small the threads only wait on each other (a busy 2-core
    # machine took 5 s a run with two, 0.3 s with one)
    rc, _, err = run(["env", "OMP_NUM_THREADS=1", RUNCPU, model, "-i", "!", "-n", str(DRAWS), "-v", "1",
                      "-s", str(seed), "-t", str(temperature), "-k", str(k), "-p", str(p), "-P", str(m)])
    assert rc == 0, err
    assert next(l for l in err.splitlines() if l.startswith("prompt ids:")) == "prompt ids: 0"
    ids = [int(t) for t in next(l for l in err.splitlines() if l.startswith("generated ids:")).split(":")[1].split()]
    assert len(ids) == DRAWS, f"{len(ids)} draws, expected {DRAWS}"
    return np.array(ids)


def test_sampling_matches_hf_warpers():
    model = write_checkpoint(os.path.join(TMP, "sampler.bin"), LOGITS)
    logits, _ = logits_of(model, [0, 17, 63])
    assert (logits == logits[0]).all(), "the synthetic model's logits depend on the token or the position"
    logits = logits[0]
    rejected_by = {name: [] for name in BROKEN}
    for seed, case in enumerate(CASES, 1):
        counts = np.bincount(sampled_ids(model, case, seed), minlength=VOCAB)
        probs = hf_probs(logits, *case)
        support = np.flatnonzero(probs)
        outside = np.flatnonzero(counts * (probs == 0))
        assert not outside.size, f"{case}: drew ids outside HF's support {support.tolist()}: {outside.tolist()}"
        assert DRAWS * probs[support].min() >= 50, "too few expected draws for the chi-square approximation"
        p = p_value(counts, probs)
        assert p >= ALPHA, (f"(T, k, top-p, min-p) = {case}: p-value {p:.1e} against HF's probabilities\n"
                            f"  HF   {probs[support].round(4).tolist()}\n"
                            f"  ours {(counts[support] / DRAWS).round(4).tolist()}")
        rejected = [name for name, broken in BROKEN.items() if p_value(counts, broken(logits, *case)) < ALPHA]
        for name in rejected:
            rejected_by[name].append(case)
        print(f"     {case}: support {len(support)}, p-value {p:.3f}; rejects {', '.join(rejected)}")
    undetected = [name for name, cases in rejected_by.items() if not cases]
    assert not undetected, f"no case tells these broken samplers from HF: {undetected}"
