"""``rankshard-study``: one TOML file describes a whole study; one command materializes, trains every (variant,
seed), evaluates every checkpoint and writes one report with seed spread and paired tests (issue 16)."""
