"""Pure math on tensors: the exact factored SVD, rank selection, the size budget and metrics.

Nothing here knows about files, keys or formats: tensors and numbers in, tensors and numbers out.
Submodules are imported where used, so `lorad.engine.reduce.methods` stays free of torch.
"""
