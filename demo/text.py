"""The demo's text: tinyshakespeare, split into training and validation text (numpy-free, so the
tests and the GPU scripts share it with demo/train.py)."""


def split(text):
    """(train, validation): the first 90% of the characters, extended to the end of its line, and the rest."""
    cut = text.index("\n", int(len(text) * 0.9)) + 1
    return text[:cut], text[cut:]
