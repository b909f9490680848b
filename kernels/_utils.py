"""Small helpers shared by the kernel wrappers: block sizes and launch checks."""

from __future__ import annotations

import torch
import triton


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel: object, *tensors: torch.Tensor) -> bool:
    """Check that all tensors share one device the kernel can run on; True under the interpreter.

    The interpreter is chosen when the kernel module is imported: on CPU the kernels run only
    if `TRITON_INTERPRET=1` was set before `radixflow.kernels.*` was first imported. Under the
    interpreter (whatever the device) the kernels upcast loads to float32, since it mishandles
    16-bit floats, and use small blocks.
    """
    devices = {t.device for t in tensors}
    assert len(devices) == 1, f"tensors on several devices: {devices}"
    interpreted = is_interpreted(kernel)
    if next(iter(devices)).type == "cpu" and not interpreted:
        raise RuntimeError(
            "radixflow Triton kernels got CPU tensors but were compiled for a GPU; set "
            "TRITON_INTERPRET=1 before importing radixflow.kernels to run them on CPU")
    return interpreted
