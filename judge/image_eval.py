"""Scores of generated images for every image generator of the project: FID against a reference
set's training split, and class accuracy by the project's classifier.

Every FID carries its label, "FID-<N> vs <reference>": FID is biased upwards for small N, so
FID-1k and FID-10k (or two references) never compare.
"""

from __future__ import annotations

import torch

from shared.errors import UserError
from shared.fid import InceptionFeatures, feature_stats, fid_from_stats, reference_stats
from shared.images import load_images

from .classifier import class_accuracy, load_classifier


def count_label(n: int) -> str:
    """10000 -> '10k', 1500 -> '1.5k', 500 -> '500'."""
    return f"{n / 1000:g}k" if n >= 1000 else str(n)


def score_images(images: torch.Tensor, labels: torch.Tensor, classes: list[str], *, reference: str | None,
                 classifier: str | None, device: torch.device) -> dict:
    """uint8 images [N, 3, H, W] generated for `labels` (indices into `classes`). FID when
    `reference` (a data spec) is given, class accuracy when `classifier` (a run) is."""
    result: dict = {"num_samples": len(images)}
    if reference is not None:
        ref = load_images(reference, "train")
        if ref.images.shape[1:] != images.shape[1:]:
            raise UserError(f"reference images are {tuple(ref.images.shape[1:])}, generated ones {tuple(images.shape[1:])}")
        extractor = InceptionFeatures(device)
        ref_stats = reference_stats(ref.images, ref.description, extractor)
        print(f"Inception features of {len(images):,} images ...", flush=True)
        fid = fid_from_stats(feature_stats(extractor(images)), ref_stats)
        result.update({"fid": round(fid, 3), "fid_label": f"FID-{count_label(len(images))} vs {ref.description}",
                       "fid_reference": ref.description, "fid_reference_n": int(ref_stats["n"])})
    if classifier is not None:
        clf, clf_classes = load_classifier(classifier, device)
        missing = [c for c in classes if c not in clf_classes]
        if missing:
            raise UserError(f"the classifier does not know the classes {missing[:3]} (it has {', '.join(clf_classes)})")
        mapped = torch.tensor([clf_classes.index(c) for c in classes])[labels]
        result.update({"class_accuracy": round(class_accuracy(clf, images, mapped), 4), "classifier": str(classifier),
                       "class_accuracy_label": f"class accuracy of {len(images):,} samples by {classifier} "
                                               f"(chance {1 / len(classes):.1%})"})
    return result
