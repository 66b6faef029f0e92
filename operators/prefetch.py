"""Software prefetch for compiled sparse kernels.

A sparse × dense product reads, for every nonzero (i, j), row j of the dense block: at a million
nodes that block is far larger than the caches and the reads are scattered, so the product waits
on memory latency, not bandwidth. Asking for the row of the nonzero a few positions ahead
(``llvm.prefetch``, a hint the CPU may ignore) overlaps those waits: at 1M nodes and 64 columns the
product took 0.33 s looking 16 nonzeros ahead against 0.46 s with no look-ahead (one-off comparisons
on the benchmark's graph; ``benchmarks/diffusion_scale.py`` prints the kernel's time against scipy's).
"""

from __future__ import annotations

import llvmlite
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

AHEAD = 16  # nonzeros between a prefetch and its use (8 to 32 measured within 15% of each other)
LINE = 64  # bytes per cache line

_NAME = "llvm.prefetch.p0" if getattr(llvmlite, "opaque_pointers_enabled", True) else "llvm.prefetch.p0i8"


@intrinsic
def prefetch(typingctx, array, row, col):
    """Hint that ``array[row, col]`` (2-d) will be read soon: read access, keep in all cache levels."""
    if not (isinstance(array, types.Array) and array.ndim == 2):
        return None

    def codegen(context, builder, signature, args):
        aryty, rowty, colty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, args[1], rowty, types.intp), context.cast(builder, args[2], colty, types.intp)]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), _NAME)
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen
