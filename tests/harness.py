"""The tests use the package's parity harness (fusedopt.parity), the one `fusedopt parity` runs."""
from fusedopt.parity import (BACKENDS, DTYPES, SHAPES, errors, initial, max_ulp,  # noqa: F401
                             run)
