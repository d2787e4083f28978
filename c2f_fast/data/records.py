"""The in-memory record every dataset reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: One box: (class index, x1, y1, x2, y2) in pixels of the original image.
Box = tuple[int, float, float, float, float]


@dataclass
class MultiLabelSet:
    """A multi-label image set.

    ``targets[i, c]`` is 1 (class present), 0 (absent) or -1 (ignore: e.g. a VOC class present
    only through ``difficult`` objects). ``boxes[i]`` lists the image's boxes, empty when the
    format has none.
    """

    image_paths: list[str]
    targets: np.ndarray  # int8 [N, C] in {1, 0, -1}
    class_names: list[str]
    boxes: list[list[Box]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int8)
        n = len(self.image_paths)
        if self.targets.ndim != 2 or self.targets.shape != (n, len(self.class_names)):
            raise ValueError(
                f"targets: expected shape ({n}, {len(self.class_names)}) "
                f"(images, classes), got {tuple(self.targets.shape)}"
            )
        bad = ~np.isin(self.targets, (-1, 0, 1))
        if bad.any():
            raise ValueError(f"targets: values must be in {{1, 0, -1}}, found {np.unique(self.targets[bad]).tolist()}")
        if not self.boxes:
            self.boxes = [[] for _ in range(n)]
        if len(self.boxes) != n:
            raise ValueError(f"boxes: expected one list per image ({n}), got {len(self.boxes)}")

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
