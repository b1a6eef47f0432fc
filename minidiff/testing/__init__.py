"""Tools for checking ops: numerical gradient checks, the tolerance table, and ``check_function``
(an op's forward against a reference in each dtype, then its gradient check).

Use ``gradcheck`` on any op you add::

    x = minidiff.tensor(np.random.randn(3, 4), dtype="float64", requires_grad=True)
    assert gradcheck(lambda t: my_op(t), x)

``minidiff.testing.torch_unet`` (the U-Net written independently in PyTorch) needs PyTorch and is
imported only by name.
"""

from .check import check_function
from .gradcheck import GradcheckError, gradcheck
from .tolerances import TOLERANCES, tolerance

__all__ = ["TOLERANCES", "GradcheckError", "check_function", "gradcheck", "tolerance"]
