"""The OpenAI-compatible API over the library: ``localseek serve``.

``protocol`` checks requests and builds OpenAI's responses, ``output`` splits the model's text
(stop strings, reasoning, tool calls), ``service`` runs the model one request at a time from a
bounded queue with the prompt cache, and ``app`` is the FastAPI app over them (HTTP only).
"""
