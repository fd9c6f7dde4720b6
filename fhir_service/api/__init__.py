"""HTTP routes of ``cxr serve``, one module per domain."""
