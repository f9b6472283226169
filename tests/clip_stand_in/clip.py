"""Stand-in for OpenAI's `clip` package (not installed here): what knn2img and ldm's CLIP embedders
use of it, with a text encoder of 8 features. Like the real `clip.load`, a model name is read from
its file in `download_root`, named after the URL in `_MODELS`; unlike it, a missing file is never
downloaded (the tests point `_MODELS` at local servers or at a port nothing listens on)."""
import os

import torch

_MODELS = {"ViT-L/14": "http://127.0.0.1:9/models/ViT-L-14.pt"}  # port 9: nothing listens there


class TextModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # weights, as CLIP's, which its tokens follow

    def encode_text(self, tokens):
        return tokens.float() * self.scale + 1.0


def load(name, device="cpu", jit=False, download_root=None):
    path = os.path.join(download_root or os.path.expanduser("~/.cache/clip"),
                        os.path.basename(_MODELS[name])) if name in _MODELS else name
    if not os.path.isfile(path):
        raise RuntimeError(f"the clip stand-in downloads nothing: {path} is missing")
    return TextModel().to(device), None


def tokenize(texts, context_length=77, truncate=False):
    # as the real one: a text of more tokens than context_length (here: words) is refused unless truncated
    if not truncate and any(len(text.split()) > context_length - 2 for text in texts):
        raise RuntimeError(f"Input {texts} is too long for context length {context_length}")
    return torch.tensor([[len(text) % 7] * 8 for text in texts])
