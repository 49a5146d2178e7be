"""A minimal device app embedding mopeq_runtime: load a bundle once, answer prompts from stdin.

    python examples/app.py BUNDLE                    # text: each line is a prompt
    python examples/app.py BUNDLE --image cat.png    # VLM: each line is a question about the image

Needs only numpy, onnxruntime and tokenizers (and pillow to read image files).
"""

from __future__ import annotations

import argparse
import sys

import mopeq_runtime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--image", help="RGB image of the model's input size (VLM bundles)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--device", help="the target this app is meant for (refuses other bundles), e.g. jetson-orin-nano")
    args = ap.parse_args()
    try:
        model = mopeq_runtime.load(args.bundle, target=args.device)
    except mopeq_runtime.MopeqError as e:  # tampered, wrong device, unknown schema: say so and stop
        print(f"cannot load {args.bundle}: {e}", file=sys.stderr)
        return 2
    print(f"[{model.manifest.model.name} for {model.manifest.target.name}; {model.kernel.reason}]", file=sys.stderr)
    for line in sys.stdin:
        prompt = line.rstrip("\n")
        if not prompt:
            continue
        try:
            model.generate(prompt, max_new_tokens=args.max_new_tokens, image=args.image,
                           stream=lambda piece: print(piece, end="", flush=True))
        except mopeq_runtime.InputError as e:  # too long, bad image: report and keep serving
            print(f"[rejected: {e}]", end="")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
