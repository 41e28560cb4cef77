"""`stream-readapt eval`: QA over a live α × β grid, retrieval, metrics, lm-eval tasks, reports."""
