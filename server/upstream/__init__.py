"""The model's API: the Anthropic Messages API over httpx, or the built-in offline model."""
