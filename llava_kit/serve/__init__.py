"""Front-ends over the generation service: the terminal chat (chat.py) and the OpenAI-compatible server."""
