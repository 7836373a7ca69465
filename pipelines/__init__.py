"""Ray Data jobs that download, enrich and shard image-caption corpora once for every experiment."""

import os

# img2dataset imports albumentations, which otherwise checks PyPI for updates at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
