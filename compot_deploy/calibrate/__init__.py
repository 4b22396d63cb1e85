"""calibrate: text → batches (data) and the block-by-block walk that collects Grams and runs per-block steps
(runner)."""
