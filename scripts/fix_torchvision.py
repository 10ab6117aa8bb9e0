"""Make `import torchvision` work when a CUDA build of torchvision sits next to a CPU build of torch.

    python scripts/fix_torchvision.py        # run by scripts/install.sh after every pip install

Why: the package registry has no CPU build of torchvision. Its CUDA build's C extension links
libtorch_cuda.so, which a CPU torch lacks, so the extension does not load. torchvision copes with
that for most ops, but `_meta_registrations.py` registers fake kernels for `torchvision::nms` and
`torchvision::qnms` unconditionally, so `import torchvision` (and with it `import transformers`)
fails with "operator torchvision::nms does not exist". The fix makes those two registrations
conditional on the extension being loaded, as the others already are. llava-kit needs none of the
C ops (nms, roi_align, decode_image).

The script does nothing when `import torchvision` already works, and is idempotent.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BROKEN_SIGNATURE = "operator torchvision::nms does not exist"
FAKE_OPS = ("torchvision::nms", "torchvision::qnms")


def torchvision_import_error() -> str | None:
    """Return the error text of `import torchvision` in a fresh interpreter, or None if it works."""
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["unknown error"])[-1]


def patch_meta_registrations(path: Path) -> int:
    """Make the unconditional fake-op registrations conditional; return how many lines changed."""
    text = path.read_text()
    changed = 0
    for op in FAKE_OPS:
        plain = f'@torch.library.register_fake("{op}")'
        guarded = f'@(torch.library.register_fake("{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'
        if plain in text:
            text = text.replace(plain, guarded)
            changed += 1
    if changed:
        path.write_text(text)
    return changed


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        print("fix_torchvision: torchvision is not installed; nothing to do", file=sys.stderr)
        return 0
    error = torchvision_import_error()
    if error is None:
        print("fix_torchvision: torchvision imports fine; nothing to do", file=sys.stderr)
        return 0
    if BROKEN_SIGNATURE not in error:
        print(f"fix_torchvision: `import torchvision` fails for a reason this script does not fix:\n  {error}\n"
              "Reinstall torchvision to match torch (pip install -c constraints.txt torchvision).", file=sys.stderr)
        return 1
    target = Path(spec.origin).parent / "_meta_registrations.py"
    changed = patch_meta_registrations(target)
    print(f"fix_torchvision: torchvision's C extension does not load with this CPU build of torch; "
          f"made {changed} fake-op registrations in {target} conditional on it", file=sys.stderr)
    error = torchvision_import_error()
    if error is not None:
        print(f"fix_torchvision: `import torchvision` still fails after the patch:\n  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
