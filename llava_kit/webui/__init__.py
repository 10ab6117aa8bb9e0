"""The web chat (Gradio) over the model workers of `llava_kit.serve`: `llava-kit webui`, and / of `llava-kit serve`.

- `conversation.py`  turns of (images, question, answer) as llava-kit messages and as chat bubbles
- `app.py`           the page: a Chat tab and a Side-by-side tab, mounted on the server's FastAPI app

Importing this package imports gradio (the `webui` extra); the CLI does so only in `serve` and `webui`.
"""

from llava_kit.webui.app import build_webui, mount_webui

__all__ = ["build_webui", "mount_webui"]
