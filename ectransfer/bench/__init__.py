"""``ectransfer-bench``: throughput of every transport side by side."""
