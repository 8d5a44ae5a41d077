"""Curating labeled data: `review` (the rows most worth a person's look), `dedup` (near-duplicates and
train/test leakage) and `label_issues` (likely mislabeled images, with cleanlab)."""
