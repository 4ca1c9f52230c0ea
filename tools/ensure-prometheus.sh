#!/usr/bin/env bash
# The deploy tests need promtool and the prometheus server (Debian's `prometheus`
# package). Install it when missing and we may; otherwise say so: those tests then fail
# with a clear message rather than skip.
set -u
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's prometheus package (promtool, prometheus) for the deploy tests" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  # The package's service is not wanted: the tests start their own server.
  (systemctl stop prometheus || service prometheus stop) >/dev/null 2>&1 || true
else
  echo "promtool/prometheus missing and cannot install them (not root or no apt-get)" >&2
fi
exit 0
