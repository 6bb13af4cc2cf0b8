"""OpenAI-compatible Images API: protocol.py (the wire format), serving.py (OpenAI request -> InferenceRequest -> job ->
response), streaming.py (server-sent partial images), forms.py (the edits route's multipart body), errors.py (OpenAI's
error shape) and router.py (the routes). Laid out like vLLM's entrypoints/openai."""
