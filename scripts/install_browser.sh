#!/usr/bin/env bash
# Install a headless browser for the web chat's browser tests (tests/integration/test_webui_browser.py).
#
#     ./scripts/install_browser.sh          # run by scripts/install.sh; does nothing when chromium is there
#
# The tests drive Debian's `chromium` package with Playwright (pointed at its executable): Playwright's own
# `playwright install` downloads a browser build from the internet, which these machines cannot reach.
# Where apt-get is unavailable, or needs a password, this warns and the browser tests skip with that reason
# (CI sets LLAVA_KIT_BROWSER_TESTS=required, so there they fail instead).
set -euo pipefail

warn() { echo "install_browser: $*; the web chat's browser tests will be skipped" >&2; }

for candidate in "${LLAVA_KIT_CHROMIUM:-}" chromium chromium-browser; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1; then
    exit 0
  fi
done
if ! command -v apt-get >/dev/null 2>&1; then
  warn "no chromium and no apt-get to install it (install chromium and set LLAVA_KIT_CHROMIUM=PATH)"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    warn "installing chromium with apt-get needs root (run: sudo apt-get install chromium)"
    exit 0
  fi
fi
echo "install: chromium (apt) for the browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
  # the package lists may be missing or stale (a fresh container has none)
  "${SUDO[@]}" apt-get update -q >/dev/null 2>&1 || true
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || warn "apt-get install chromium failed"
fi
