"""The bits of the engines' MASK arguments, named: one IntFlag per kernel family, and no bit
that means two things.  Everything that builds or reads a mask goes through these names;
compiled kernels see them as constants (CONSTANTS: ``UPDATE_MASTER``, ``CODES_SIGNED_A``,
...), bound into their globals, so a mask bit costs nothing in the element loop.

(The rules' flags, DECOUPLED, REDUCE and the others, are named booleans: rules.FLAGS.)
"""
import enum


class Update(enum.IntFlag):
    """The update kernels (numba_engine, triton_engine): which of the state slots a, b, c
    the rule's state occupies (read and written), and whether the param has a float32
    master copy (the update reads and writes it, and the param is written from it,
    rounded) or a compensation buffer in its own dtype (KAHAN: kahan_sum=True, the rule's
    update added to the param as a compensated sum; the buffer takes the master's table).
    REMAINDER (with MASTER; master_weights="remainder"): the float32 master is the bfloat16
    param and an int16 remainder in the master's table, joined before the rule and split
    after it (fusedopt/remainder.py's scheme)."""
    A = 1
    B = 2
    C = 4
    MASTER = 8
    KAHAN = 128
    REMAINDER = 4096


class Codes(enum.IntFlag):
    """8-bit state (numba_quant, triton_quant), in the update kernels' mask beside Update's
    bits: slot a, b or c held as uint8 codes with a float32 absmax per block (A, B, C),
    under the signed map (SIGNED_*: row 1 of quant.engine_table) or the unsigned one;
    FOUR: the coded slots hold 4-bit codes, two per byte, an absmax per QBLOCK4 elements
    (rows 2 and 3 of the table)."""
    A = 16
    B = 32
    C = 64
    SIGNED_A = 256
    SIGNED_B = 512
    SIGNED_C = 1024
    FOUR = 8192
    ANY = A | B | C


class Matrix(enum.IntFlag):
    """The matrix kernel (numba_matrix, triton_matrix): slot a read per row, b per column, c
    per matrix; TOTAL_ONLY: the caller needs the first output's total alone (no row or
    column sums, and no column partials)."""
    A = 1
    B = 2
    C = 4
    TOTAL_ONLY = 2048
    SLOTS = A | B | C


# A mask holds Update's and Codes' bits together: they must not meet
_UPDATE = Update.A | Update.B | Update.C | Update.MASTER | Update.KAHAN | Update.REMAINDER
assert not _UPDATE & (Codes.ANY | Codes.SIGNED_A | Codes.SIGNED_B | Codes.SIGNED_C | Codes.FOUR)

# per state slot i: its bit in each family
SLOT = (Update.A, Update.B, Update.C)
CODED = (Codes.A, Codes.B, Codes.C)
SIGNED = (Codes.SIGNED_A, Codes.SIGNED_B, Codes.SIGNED_C)

CONSTANTS = {f"{family.__name__.upper()}_{m.name}": int(m)
             for family in (Update, Codes, Matrix) for m in family}
# the same as names, which the Numba kernels' code imports (numba reads a global int as a
# constant; the Triton engine binds CONSTANTS as constexprs)
UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_MASTER, UPDATE_KAHAN, UPDATE_REMAINDER = map(int, Update)
CODES_A, CODES_B, CODES_C, CODES_SIGNED_A, CODES_SIGNED_B, CODES_SIGNED_C, CODES_FOUR = \
    map(int, Codes)
MATRIX_A, MATRIX_B, MATRIX_C, MATRIX_TOTAL_ONLY = map(int, Matrix)
assert CONSTANTS == {n: globals()[n] for n in CONSTANTS}


def update_mask(used, master, coded=(), signed=(), kahan=False, remainder=False, four=False):
    """An update kernel's mask (an int): ``used``, ``coded`` and ``signed`` say per state
    slot (a, b, c) whether it is in use, held as 8-bit codes, under the signed map;
    ``master``, ``kahan``: the param's float32 master copy, its compensation buffer (the
    two share one table: never both); ``remainder``: the master held as the param and
    an int16 remainder (implies ``master``); ``four``: the coded slots hold 4-bit codes."""
    assert not (master and kahan) and (master or not remainder)
    mask = (Update.MASTER if master else 0) | (Update.KAHAN if kahan else 0) \
        | (Update.REMAINDER if remainder else 0) | (Codes.FOUR if four and any(coded) else 0)
    for i, u in enumerate(used):
        q, s = i < len(coded) and coded[i], i < len(signed) and signed[i]
        mask |= (SLOT[i] if u else 0) | (CODED[i] if q else 0) | (SIGNED[i] if q and s else 0)
    return int(mask)
