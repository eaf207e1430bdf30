"""Shared pytest setup: tests run on CPU, from the repository root, deterministically."""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project is flat files at the root, not a package
torch.set_num_threads(min(2, torch.get_num_threads()))
# archive indexes (data.index_cache) go to a folder of this test session, not to ~/.cache
os.environ["SIMMIM_INDEX_CACHE"] = tempfile.mkdtemp(prefix="simmim-index-")


def write_inat18(root, n_train=12, n_val=6):
    """A miniature of iNaturalist 2018 as released: train2018.json and val2018.json (COCO-style) next to
    train_val2018/<supercategory>/<category id>/<hash>.jpg, three species with the non-contiguous ids
    3, 17 and 42 (the label order), each a different colour. Returns the category id of every image."""
    import json
    import numpy as np
    from PIL import Image
    categories = [dict(id=17, name="Danaus plexippus", supercategory="Insecta"),  # listed unsorted, as ids may be
                  dict(id=3, name="Quercus robur", supercategory="Plantae"), dict(id=42, name="Larus argentatus", supercategory="Aves")]
    rng, ids = np.random.default_rng(0), {}
    for split, n, first_id in (("train", n_train, 1000), ("val", n_val, 5000)):
        images, annotations = [], []
        for k in range(n):
            cat = categories[k % 3]
            name = f"train_val2018/{cat['supercategory']}/{cat['id']}/{rng.bytes(6).hex()}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 60, (48, 64, 3)) + np.array([200, 0, 0]) * (k % 3 == 0) + np.array([0, 200, 0]) * (k % 3 == 1)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name)
            images.append(dict(id=first_id + 7 * k, file_name=name, width=64, height=48, license=1))
            annotations.append(dict(id=k, image_id=first_id + 7 * k, category_id=cat["id"]))
        annotations.reverse()  # annotations need not follow the image order
        (root / f"{split}2018.json").write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
        ids[split] = [categories[k % 3]["id"] for k in range(n)]
    return ids
