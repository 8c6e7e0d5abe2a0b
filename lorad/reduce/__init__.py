"""Pure math on tensors: the exact factored SVD, rank selection, the size budget and metrics.

Nothing here knows about files, keys or formats: tensors and numbers in, tensors and numbers out.
"""

from lorad.reduce.select import METHODS, select_rank
from lorad.reduce.svd import FactoredSVD, factored_svd

__all__ = ["METHODS", "FactoredSVD", "factored_svd", "select_rank"]
