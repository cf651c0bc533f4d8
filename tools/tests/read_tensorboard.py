"""Reads back TensorBoard event files with TensorBoard's own loader and prints what it found as
JSON: {run: {"scalars": {tag: [steps]}, "images": {tag: [[step, width, height]]}}}.
Used by tests/tests/pipeline.rs to prove `coordinator export --tensorboard` writes files
TensorBoard reads.

Run: .venv/bin/python tools/tests/read_tensorboard.py DIR
"""

import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    root = sys.argv[1]
    found = {}
    for folder, _, files in os.walk(root):
        if not any(name.startswith("events.out.tfevents") for name in files):
            continue
        accumulator = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        run = os.path.relpath(folder, root)
        found[run] = {
            "scalars": {tag: [event.step for event in accumulator.Scalars(tag)] for tag in tags["scalars"]},
            "images": {tag: [[event.step, event.width, event.height] for event in accumulator.Images(tag)] for tag in tags["images"]},
        }
    print(json.dumps(found))


if __name__ == "__main__":
    main()
