#!/bin/sh
# Behaves as the official image's docker-entrypoint.sh (valkey-io/valkey-container): flags or a
# .conf file run valkey-server; as root, /data is handed to the valkey user and the server drops
# to it. The official build turns protected mode off by default; Debian's does not, so it is
# turned off here.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- valkey-server "$@"
fi
if [ "$1" = valkey-server ]; then
  shift
  set -- valkey-server --protected-mode no "$@"
  if [ "$(id -u)" = 0 ]; then
    find . \! -user valkey -exec chown valkey '{}' +
    exec setpriv --reuid=valkey --regid=valkey --clear-groups -- "$@"
  fi
fi
exec "$@"
