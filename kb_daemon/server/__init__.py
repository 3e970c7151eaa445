"""`kbctl serve`: the edited models over HTTP (OpenAI-compatible answers, the admin API, metrics)."""
