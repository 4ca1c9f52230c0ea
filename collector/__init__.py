"""The in-process collector: squared gradient norms per parameter group, published over ZeroMQ."""
