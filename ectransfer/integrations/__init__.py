"""Framework adapters. Each one is the only place that imports its framework."""
