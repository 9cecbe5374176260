"""Building blocks of the decoder; the math runs in torch.ops.pnl kernels and torch matmuls."""
