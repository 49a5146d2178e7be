"""A VQA .npz as an image folder + records.jsonl (the calibration format for images of any size).

The .npz sets hold 64x64 images; a real vision tower (SigLIP-so400m: 384x384) takes them from a folder,
where the calibration loader resizes each image to the model's size (`load_image(..., fit=True)`).

    python scripts/vqa_folder.py --npz ../shared/data/vqa_calib.npz --out /tmp/vqa384 [--samples 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--npz", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    with np.load(args.npz) as z:
        images, questions, answers = z["images"], z["questions"], z["answers"]
        tasks = z["tasks"] if "tasks" in z.files else np.array([""] * len(questions))
    n = len(questions) if args.samples is None else min(args.samples, len(questions))
    with open(args.out / "records.jsonl", "w") as f:
        for i in range(n):
            name = f"{i:05d}.png"
            Image.fromarray(images[i]).save(args.out / name)
            f.write(json.dumps({"image": name, "question": str(questions[i]), "answer": str(answers[i]),
                                "task": str(tasks[i])}) + "\n")
    print(f"{n} samples -> {args.out}")


if __name__ == "__main__":
    main()
