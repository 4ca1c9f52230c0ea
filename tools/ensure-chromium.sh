#!/usr/bin/env bash
# The daemon's live page is tested in a real headless browser: Chromium (Debian's `chromium`
# package) loads it, follows a link to a live run and reads the chart. Install it when missing
# and we may; otherwise say so: that test then fails under CI and skips elsewhere, with a
# message naming this script.
set -u
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium package for the browser test of the daemon's live page" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "chromium missing and cannot install it (not root or no apt-get)" >&2
fi
exit 0
