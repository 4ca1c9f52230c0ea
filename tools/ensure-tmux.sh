#!/usr/bin/env bash
# The live view of `esper-telemetry top` is tested in a real terminal: tmux (Debian's `tmux`
# package) runs it, types `q` and reads the screen. Install it when missing and we may;
# otherwise say so: that test then skips with a message naming this script.
set -u
if command -v tmux >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's tmux package for the terminal test of esper-telemetry top" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null
else
  echo "tmux missing and cannot install it (not root or no apt-get)" >&2
fi
exit 0
