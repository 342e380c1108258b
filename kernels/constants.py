"""The lincomb kernels' shared constants, in one place: ``pndm_fast.ops`` (checks), ``kernels/lincomb.py``
(Triton) and ``kernels/aot.py`` read them here; ``csrc/lincomb.cpp`` exports its own compile-time copies as
``pndm_fast._C.MAX_OPERANDS``, ``DTYPE_CODES`` and ``ABI_VERSION``, which ``pndm_fast.ops`` refuses to use when
they differ from these (tests/test_ops.py checks both sides).

Imports torch only, never triton, so the CPU paths work without triton.
"""

import torch

# Operands per call: 4 past eps of F-PNDM's eq. 12 plus the new eps; a longer sum is split into two calls.
MAX_OPERANDS = 5
# Operand dtypes and their codes (the position): the C++ kernel receives the code of each operand.
OPERAND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPERAND_CODES = {dtype: code for code, dtype in enumerate(OPERAND_DTYPES)}
# The names the C++ module gives the codes (its DTYPE_CODES), the same order.
OPERAND_CODE_NAMES = {"float32": 0, "bfloat16": 1, "float16": 2}
# The C++ kernel's argument list: a build with another version is stale (2: the blend arguments).
ABI_VERSION = 2
# x, out and out2 of the fused (triton, cpp) kernels; the torch twin also takes float64.
STATE_DTYPE = torch.float32
