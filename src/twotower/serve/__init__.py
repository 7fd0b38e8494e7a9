"""An OpenAI-compatible completions server over the continuous-batching engine (standard library HTTP)."""
