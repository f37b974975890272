"""The layout of a row of ``fusedopt.quant.engine_table()``, the 8-bit map as both engines
read it, and the constants of the code's formula: defined once here, for quant.py (which
fills the table), numba_quant and triton_quant (which read it).  Columns 0-255 hold the
map's 256 values."""
QBLOCK = 256  # elements per absmax
QBLOCK4 = 128  # elements per absmax of 4-bit state (torchao's AdamW4bit's block)
ROWS = 4  # rows of the table: the unsigned and signed maps of 8 bits, then of 4 bits
# 4-bit rows: columns 0-15 hold the map's 16 values, MID4 + i (i < 15) the float32
# boundary between values i and i + 1 (quant.midpoints: arithmetic, geometric for the log
# map of second moments); a code is the count of midpoints below y
MID4 = 16
LOW = 256  # 7 columns: LOW + i is the lowest y that decade i (10^(i-6) ... ) takes
P = 263  # 7 columns: P + i is 10^(6-i) / 0.9, decade i's scale
PARTS = 270  # 7 columns: PARTS + i is the number of values in decade i
NINTH = 277  # 1 / 9 (0.1 / 0.9: where a decade starts, in its own scale)
TOP_MID = 278  # the midpoint between the map's largest value below 1 and 1
TOP_K = 279  # the code of 1, counted from the code of 0
# 256 columns: the map's values as four planes of bytes (plane p, 64 columns: byte p of
# each value, in code order), which the CPU engine looks up with byte permutes
PLANES = 280
# 32 columns each: for y in [2^-31, 2) (float32 exponent field E in 96..127), bucket
# b = E - 96 = E mod 32 (y in [2^(b-31), 2^(b-30))): EXP_D + b is the count of the
# boundaries LOW[1..6] and TOP_MID below the bucket, EXP_LOW + b the one inside it or
# inf; the decade is EXP_D[b] + (y > EXP_LOW[b]), two permutes and a compare
# (numba_quant's _coders), and "decade 7" (above TOP_MID) is 1's code.  LOW[0] lies
# above 2^-31: any smaller y has code 0 whatever its bucket
EXP_D = 536  # (int32 bits)
EXP_LOW = 568
# 16 columns each, per decade d (0-6): PA = PARTS * P and PB = PARTS * NINTH (exact: PARTS is
# a power of 2), so that PARTS * fma(y, P, -1/9) is fma(y, PA, -PB) bit for bit; as int32
# bits: PK, decade d's first code counted from the code of 0 (PARTS - u), and PARTS - 1.
# Decade 7: PA = PB = PM = 0, PK = TOP_K
PA = 600
PB = 616
PK = 632
PM = 648
TABLE = 664  # columns in a row
# a block whose absmax is under TINY is scaled by 1 / TINY (exactly) before the reciprocal
# of its absmax is taken: a subnormal absmax has no finite float32 reciprocal
TINY = 2.0 ** -64
