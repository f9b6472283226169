"""TEST-ONLY in-memory dataset for training smoke tests of main.py."""
import numpy as np
from torch.utils.data import Dataset


class RandomCaptionedImages(Dataset):
    """``n`` random images (HWC float32 in [-1, 1], key "jpg") with captions (key "txt")."""

    def __init__(self, n=8, size=64, seed=0):
        rng = np.random.default_rng(seed)
        self.images = rng.uniform(-1, 1, size=(n, size, size, 3)).astype(np.float32)
        self.captions = [f"a {c} chair" for c in ("red", "blue", "green", "wooden")] * (n // 4 + 1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"jpg": self.images[i], "txt": self.captions[i]}
