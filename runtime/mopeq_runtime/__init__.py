"""mopeq_runtime: run a MoPEQ bundle on a device with numpy, onnxruntime and tokenizers only.

    import mopeq_runtime
    model = mopeq_runtime.load("bundle/")          # verifies hashes, registers the kernel if it can
    print(model.generate("The os module", max_new_tokens=32).text)

Importing this package never imports torch or transformers (tests/test_runtime.py checks it).
"""

from .errors import BundleError, InputError, MopeqError
from .loader import load, open_bundle
from .manifest import SCHEMA_VERSION, Manifest
from .model import BundleModel, Generation, KernelStatus, Past

__all__ = ["load", "open_bundle", "BundleModel", "Generation", "KernelStatus", "Past", "Manifest",
           "SCHEMA_VERSION", "BundleError", "InputError", "MopeqError"]
