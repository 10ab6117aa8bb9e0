"""`llava-kit chat`: talk to a model about images on a terminal.

    llava-kit chat --model runs/demo/merged --image pic.png                      # interactive REPL
    llava-kit chat --model runs/demo/merged --image pic.png --prompt "What shape is in the image?"

The conversation lives in `llava_kit.inference.ChatSession` (the generation service underneath); this module is
the terminal around it.
"""

from __future__ import annotations

import sys

from llava_kit.errors import LlavaKitError
from llava_kit.inference.session import ChatSession

REPL_HELP = """commands:
  /image PATH   switch to another image (it joins the conversation at your next message)
  /reset        forget the conversation and the images
  /help         this text
  /exit         quit (or Ctrl-D)"""


def run_repl(session: ChatSession, image: str | None = None, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Interactive multi-turn chat on a terminal; answers stream to stdout as they are generated."""
    if image:
        session.set_image(image)
    print(f"chatting (image: {image or 'none'}); /help for commands", file=sys.stderr)
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/help":
            print(REPL_HELP, file=sys.stderr)
            continue
        if line == "/reset":
            session.reset()
            print("conversation cleared", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path)
                print(f"image: {path}", file=sys.stderr)
            except LlavaKitError as err:
                print(f"cannot use {path!r}: {err}", file=sys.stderr)
            continue

        def write(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        session.ask(line, on_text=write)
        stdout.write("\n")
        stdout.flush()
