#!/bin/sh
# Behaves as the official image's entrypoint.sh (traefik/traefik-library-image): flags and
# Traefik subcommands run Traefik, anything else runs as given.
set -e
case "$1" in
  -*) set -- traefik "$@" ;;
esac
if [ "$1" != traefik ] && traefik "$1" --help >/dev/null 2>&1; then
  set -- traefik "$@"
fi
exec "$@"
