"""ndc, the Neighbourhood Distillation Compiler.

Compile a trained PyTorch teacher into a smaller student by cutting it into
neighbourhoods at single-tensor boundaries, distilling a student for each
neighbourhood independently, and stitching the students back together.
"""

from ndc.errors import NdcError

__version__ = "0.1.0"
__all__ = ["NdcError", "__version__"]
