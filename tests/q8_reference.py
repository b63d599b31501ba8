"""Issue 10's Q8_0 quantization written out in torch, for the GPU scripts' int8 references
(gpu_kernels.py, gpu_prefill.py, gpu_parity.py): independent of export.py's numpy quantizer."""
import torch


def q8_0(w):
    """Issue 10's Q8_0 (ggml's quantize_row_q8_0_ref) of a matrix (rows, cols), cols % 32 == 0: per block
    of 32 consecutive weights of a row, in float32 from w's values as float32, d = amax / 127, id = 1 / d (0 if
    d == 0), q = x * id rounded half away from zero, scale = fp16(d) (to nearest even). Each float32 step is
    done in float64 and rounded to float32 once, which is the float32 result (float64 carries more than
    2 x 24 + 2 bits, so the double rounding is innocuous; and it does not depend on how torch divides by a
    scalar); the rounding of q acts on float32 values held exactly. Returns (q int8 (rows, cols), scales fp16
    (rows, cols / 32))."""
    if w.shape[0] > 8192:  # bounded float64 temporaries
        parts = [q8_0(c) for c in w.split(8192)]
        return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
    x = w.float().reshape(w.shape[0], -1, 32).double()
    d = (x.abs().amax(-1) / 127).float()
    inv = torch.where(d != 0, 1 / d.double(), torch.zeros_like(d, dtype=torch.float64)).float()
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))  # 1 / d beyond float32 (|x| < 3.7e-37): 0, as export.py
    y = (x * inv.double()[..., None]).float().double()
    t = y.trunc()
    q = torch.where((y - t).abs() >= 0.5, t + y.sign(), t)
    return q.to(torch.int8).reshape(w.shape), d.half()


def dequant(q, scales):
    """float32(q) * float32(scale), exact in float32 (and so in float64)"""
    return (q.float().reshape(q.shape[0], -1, 32) * scales.float()[..., None]).reshape(q.shape)
