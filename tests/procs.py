"""Process helpers for the kill tests (they live with the pool, which the soak benchmark uses too)."""
from rankshard.preprocess.workers import alive, worker_pids  # noqa: F401
