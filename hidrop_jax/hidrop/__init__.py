"""HiDrop: late injection, concave pyramid pruning, early exit (schedule, selection, analysis)."""
