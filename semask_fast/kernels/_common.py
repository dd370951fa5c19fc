"""``@triton.jit`` helpers shared by the kernel modules."""

import triton
import triton.language as tl


@triton.jit
def mm(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32; fp32 operands use IEEE products (no tf32) to keep 1e-4 parity on GPUs.

    DOT_FP32 is the interpreter-only bf16 workaround (triton issue 11584, see ``semask_fast.kernels``):
    the operands are upcast just for the product.
    """
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
